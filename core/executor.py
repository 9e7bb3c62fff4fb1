"""The one executor: runs every enabled method of a plan around model calls and block calls.

It is host-agnostic plain PyTorch. The ComfyUI integration creates a `RunContext` per sampling run
(from its OUTER_SAMPLE wrapper), a `CallState` per diffusion-model call (from its DIFFUSION_MODEL
wrapper) and hands every block call (from `patches_replace["dit"]`) to `RunContext.block_call`.
With no method enabled every path calls straight through to the host's own code, so the output is
bit-identical to the unpatched model.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, ContextManager, Hashable, Sequence

import torch

from ..families import BlockInternals, BlockRef, BlockWork, CallLayout, ModelAdapter
from .flops import FlopBreakdown
from .method import REGISTRY, BlockArgs, BlockFn, DynamicMethod
from .plan import DynamicPlan
from .slicing import RunIndexCache, WeightSource, plain_weights
from .steps import StepInfo, StepTracker
from .telemetry import CallRecord, RunRecord

# Signature of ComfyUI's `patches_replace` block patches: patch(args, {"original_block": fn}) -> dict
ForeignPatch = Callable[[BlockArgs, dict], dict]


@dataclass(frozen=True)
class Chunk:
    """One cond/uncond chunk of a batched model call."""

    kind: str  # "cond" or "uncond"
    uuid: object
    rows: slice


@dataclass
class ModelCall:
    """The arguments of one diffusion-model call, by the host's parameter names."""

    arguments: dict[str, Any]
    _invoke: Callable[[dict[str, Any]], torch.Tensor]
    # What must hold while the host runs this call, and only then (not while a later method makes calls of its own
    # first, as the width calibration does): context managers, made when the call is invoked.
    holding: tuple[Callable[[], ContextManager[Any]], ...] = ()

    def with_arguments(self, **changes: Any) -> "ModelCall":
        return ModelCall({**self.arguments, **changes}, self._invoke, self.holding)

    def while_running(self, context: Callable[[], ContextManager[Any]]) -> "ModelCall":
        """The call with `context` entered around the host's run of it."""
        return replace(self, holding=(*self.holding, context))

    @property
    def transformer_options(self) -> dict:
        """The call's transformer_options, a named parameter or (Z-Image's forward) one of its **kwargs."""
        if "transformer_options" in self.arguments:
            return self.arguments["transformer_options"] or {}
        return (self.arguments.get("kwargs") or {}).get("transformer_options") or {}

    def with_transformer_options(self, options: dict, **changes: Any) -> "ModelCall":
        """The call with other transformer_options (where the model takes them) and other `changes`."""
        if "transformer_options" in self.arguments or "kwargs" not in self.arguments:
            return self.with_arguments(transformer_options=options, **changes)
        return self.with_arguments(kwargs={**self.arguments["kwargs"], "transformer_options": options}, **changes)

    def invoke(self) -> torch.Tensor:
        if not self.holding:
            return self._invoke(self.arguments)
        with contextlib.ExitStack() as stack:
            for context in self.holding:
                stack.enter_context(context())
            return self._invoke(self.arguments)


@dataclass
class CallState:
    run: "RunContext"
    step: StepInfo
    chunks: tuple[Chunk, ...]
    shape: CallLayout  # as the unpatched model would see this call
    diffusion_model: torch.nn.Module
    record: CallRecord
    layout: CallLayout  # as the blocks see it so far (the adapter refines it from the block calls)
    block_work: dict[BlockRef, BlockWork] = field(default_factory=dict)
    # The sampler's x of this call's rows before the host's input scaling and cast to the model's
    # dtype (full precision), where the host hands it over; None otherwise.
    sampler_x: torch.Tensor | None = None

    def add_executed(self, flops: FlopBreakdown) -> None:
        self.record.executed = self.record.executed + flops


class RunContext:
    """Per-sampling-run state: the plan's method runtimes, the step tracker, the run's telemetry."""

    def __init__(
        self,
        plan: DynamicPlan,
        adapter: ModelAdapter,
        sigmas: Sequence[float],
        *,
        latent_shape: tuple[int, ...],
        model_name: str,
        device: torch.device | str,
        sigma_to_percent: Callable[[float], float] | None = None,
        percent_to_sigma: Callable[[float], float] | None = None,
        weight_source: WeightSource | None = None,
        progress_listener: Callable[[dict], None] | None = None,
        model_sampling: Any = None,
        weights_key: Hashable = None,
    ) -> None:
        self.plan = plan
        self.adapter = adapter
        self.device = torch.device(device)
        self.steps = StepTracker(sigmas, sigma_to_percent)
        self.percent_to_sigma = percent_to_sigma
        # Effective (cast, dequantised, LoRA-applied) weights, for work that needs a weight itself.
        self.weight_source = weight_source or plain_weights
        # Index tensors that depend only on a decision (kept heads, text positions), this run only.
        self.indices = RunIndexCache()
        # The host's sigma <-> model-input math (timestep(sigma), calculate_input, calculate_denoised,
        # noise_scaling), for methods that run the model on inputs of their own (calibration).
        self.model_sampling = model_sampling
        # Identity of the weights the model runs with (None: unknown), for caches that outlive a run.
        self.weights_key = weights_key
        self._progress_listener = progress_listener
        self.record = RunRecord(
            model=model_name,
            device=_device_name(self.device),
            plan=plan.describe(),
            latent_shape=tuple(latent_shape),
            total_steps=self.steps.total_steps,
            schedule=tuple(round(float(sigma), 6) for sigma in sigmas),
        )
        runtimes = [REGISTRY[s.method](s, self) for s in plan.enabled_settings()]
        self.methods: list[DynamicMethod] = sorted(runtimes, key=lambda m: m.order)
        self._call_index = 0

    # --- sampling steps -----------------------------------------------------------------------
    def step_callback(self, step: int, latent: torch.Tensor) -> None:
        """The sampler's per-step callback: step `step` made its first model evaluation from `latent`."""
        self.steps.step_callback(step)
        for method in self.methods:
            method.on_step(step, latent)
        if self._progress_listener is not None:
            # steps before `step` are settled: their extra evaluations all happened before this callback;
            # a step is shown once the device has finished its calls (their timers are read without waiting)
            settled = step
            for call in self.record.calls:
                if not call.resolve(wait=False) and call.step is not None:
                    settled = min(settled, call.step)
            self._progress_listener(self.record.progress(settled_steps=settled))

    def finish(self) -> RunRecord:
        self.steps.finish()
        try:
            for method in self.methods:
                method.finish()
        finally:
            self.indices.clear()
            for call in self.record.calls:  # the run is over: reading device values costs nothing now
                call.resolve(wait=True)
                call.format_methods()
            self.record.finished = True
        if self._progress_listener is not None and self.record.calls:
            self._progress_listener(self.record.progress())
        return self.record

    # --- model calls --------------------------------------------------------------------------
    def begin_call(
        self,
        sigma: float | torch.Tensor,
        cond_or_uncond: Sequence[int] | None,
        uuids: Sequence[object] | None,
        shape: CallLayout,
        diffusion_model: torch.nn.Module,
    ) -> CallState:
        chunks = _chunks(shape.batch, cond_or_uncond, uuids)
        record = CallRecord(
            index=self._call_index,
            step=None,
            sigma=math.nan,  # set by the step tracker (at once, or when the run ends)
            chunks=tuple(c.kind for c in chunks),
            batch=shape.batch,
            image_tokens=shape.image_tokens,
            full=self.adapter.full_flops(shape),
        )
        self._call_index += 1
        step = self.steps.locate(sigma, tuple((c.kind, c.uuid) for c in chunks), record)
        return CallState(self, step, chunks, shape, diffusion_model, record, layout=shape)

    def end_call(self, call: CallState, seconds: float) -> None:
        call.record.seconds = seconds
        self.record.calls.append(call.record)

    def timed(self, call: CallState, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a model call, timing it into the call's record: on CUDA with events on the stream
        (read when they have completed, never waited for during the run), else with the host clock."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            call.record.timer = (start, end)
            self.end_call(call, 0.0)
            return out
        start_time = time.perf_counter()
        out = fn()
        self.end_call(call, time.perf_counter() - start_time)
        return out

    def model_call(self, call: CallState, model_call: ModelCall) -> torch.Tensor:
        def run_model(mc: ModelCall) -> torch.Tensor:
            call.record.ran_model = True
            call.add_executed(self.adapter.stem_flops(self.adapter.call_layout(mc.arguments)))
            return mc.invoke()

        proceed: Callable[[ModelCall], torch.Tensor] = run_model
        for method in reversed(self.methods):
            proceed = partial(method.wrap_model_call, call, proceed=proceed)
        return proceed(model_call)

    # --- block calls --------------------------------------------------------------------------
    def block_call(
        self,
        call: CallState,
        block: BlockRef,
        args: BlockArgs,
        original_block: BlockFn,
        foreign: ForeignPatch | None = None,
    ) -> dict:
        call.layout = self.adapter.block_layout(block, args, call.layout)

        def run_block(block_args: BlockArgs) -> dict:
            work = self.adapter.block_work(block, block_args, call.layout)
            internals = BlockInternals()
            for method in self.methods:
                internals = method.block_internals(call, block, block_args, internals)
            inner, extra_flops = original_block, []
            if not internals.is_full:
                module = self.adapter.block_module(call.diffusion_model, block)
                work = self.adapter.reduced_work(block, work, internals)
                inner = partial(
                    self.adapter.run_block, module, block,
                    internals=internals, flop_log=extra_flops, layout=call.layout, cache=self.indices,
                )
            out = foreign(block_args, {"original_block": inner}) if foreign is not None else inner(block_args)
            if extra_flops:
                work = replace(work, extra_flops=work.extra_flops + sum(extra_flops))
            call.block_work[block] = work
            call.add_executed(self.adapter.block_flops(block, work))
            return out

        proceed: BlockFn = run_block
        for method in reversed(self.methods):
            proceed = partial(method.wrap_block, call, block, proceed=proceed)
        return proceed(args)


def _chunks(batch: int, cond_or_uncond: Sequence[int] | None, uuids: Sequence[object] | None) -> tuple[Chunk, ...]:
    kinds = list(cond_or_uncond or [0])
    if batch % len(kinds):
        # The host batched something we do not understand; treat the call as one cond chunk.
        kinds = [0]
    size = batch // len(kinds)
    ids = list(uuids) if uuids is not None and len(uuids) == len(kinds) else [None] * len(kinds)
    return tuple(
        Chunk("uncond" if kind == 1 else "cond", ids[i], slice(i * size, (i + 1) * size)) for i, kind in enumerate(kinds)
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


__all__ = ["CallState", "Chunk", "ModelCall", "RunContext"]
