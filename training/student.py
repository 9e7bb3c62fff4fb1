"""The student: the frozen host model with the registered methods' trainable parts, run through the adapter's blocks.

Each part (`core.method.TrainablePart`, one per method under `methods/<name>/trainable.py`) adds what its method
does at inference: masks on the input columns a width decision drops, low-rank bypasses, token routing, a coarse
call. The student runs the host's own blocks (`adapter.run_block` with `BlockInternals.linear_overrides`, nothing
copied) and asks the parts in their canonical order, as the executor asks the runtimes; FLOPs come from the
adapter's analytic counts with each part's additions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from ..core.method import PARTS, LinearPieces, TrainablePart
from ..core.slicing import RunIndexCache
from ..families import BlockInternals, BlockRef, CallLayout, ModelAdapter
from .adapted_linear import AdaptedLinear
from .checkpointing import checkpointed
from .trajectories import TRAINER_KEYS, Trajectories


@dataclass(frozen=True)
class StudentSpec:
    """What the student learns: the parts, and each part's settings (read by the part that uses them)."""

    parts: tuple[str, ...] = ("width", "td_lora")
    width_parts: str = "both"  # what the width router thins: "both", "heads" or "mlp"
    mlp_groups: int = 0  # MLP channel groups per block; 0 = the Width Patcher's default (`default_group_count`)
    experts: int = 2  # TD-LoRA K
    rank: int = 4
    gate_hidden: int = 32
    gate_embed: int = 64
    init_logit: float = 3.0  # router bias at the start: every unit kept (training starts from full compute)
    coarse_schedule: str = "0-70%:2"  # "coarse": the steps that run coarse (the Patch Scheduler's manual schedule)
    coarse_init: str = "area"  # "coarse": how the layers start ("area": the training-free path; "pinv_bilinear": DDiT's)
    ratio_regions: int = 4  # "tokens": timestep regions with their own keep ratios (equal spans of sigma percent)
    ratio_bins: int = 20  # "tokens": keep-ratio bins the training interpolates between (DiffCR)
    min_keep: float = 0.1  # "tokens": the lowest keep ratio a block may learn
    router_init: float = 4.0  # "tokens": router bias at the start (the kept tokens' update scaled by ~0.98)
    token_mode: str = "diffcr"  # "tokens": what a token left out skips, "diffcr" the block, "sdt" its MLP (DyDiT)

    def part_types(self) -> list[type[TrainablePart]]:
        """The registered parts this spec trains, in their canonical order."""
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"Trainer: parts must be a non-empty subset of {', '.join(PARTS)}, got {', '.join(self.parts) or 'none'}.")
        return sorted((PARTS[p] for p in set(self.parts)), key=lambda part: part.order)

    def validate(self) -> None:
        for part in self.part_types():
            if part.trains_alone and len(set(self.parts)) > 1 or set(part.not_with) & set(self.parts):
                raise ValueError(part.refusal)
            part.check(self)


@dataclass
class StudentContext:
    """What a part reads of the student when it is built."""

    adapter: ModelAdapter
    diffusion_model: torch.nn.Module
    spec: StudentSpec
    generator: torch.Generator
    feature_mean: torch.Tensor
    feature_scale: float
    sigma_percent: Callable[[float], float] | None


@dataclass
class StudentCall:
    """One forward of the student over a batch (or a group of its rows), with what the parts decided for it."""

    inputs: Mapping[str, torch.Tensor]
    arguments: dict[str, Any]
    layout: CallLayout
    temperature: float = 1.0
    noise: float = 0.0
    generator: torch.Generator | None = None
    record: list | None = None
    # tensors with gradients that the blocks read (width gates, expert gates, a block's keep ratio): gradient
    # checkpointing swaps them for its own inputs while it reruns a block
    decisions: dict[str, torch.Tensor | None] = field(default_factory=dict)
    cache: RunIndexCache = field(default_factory=RunIndexCache)
    scratch: dict[str, Any] = field(default_factory=dict)  # a part's state while the call runs

    @property
    def sigmas(self) -> torch.Tensor:
        return self.inputs["sigmas"]


class DynamicStudent(torch.nn.Module):
    """Trainable parts around a frozen host diffusion model (kept outside the module's parameters, so
    DistributedDataParallel and checkpoints see only the small trainable parts)."""

    def __init__(self, adapter: ModelAdapter, diffusion_model: torch.nn.Module, spec: StudentSpec,
                 feature_mean: torch.Tensor, feature_scale: float, seed: int = 0,
                 sigma_percent: Callable[[float], float] | None = None,
                 host_training: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__()
        spec.validate()
        self.spec, self.adapter, self.host_training = spec, adapter, host_training
        object.__setattr__(self, "diffusion_model", diffusion_model)  # not a submodule: frozen, never synced
        self.blocks: tuple[BlockRef, ...] = tuple(adapter.blocks)
        context = StudentContext(adapter, diffusion_model, spec, torch.Generator().manual_seed(seed), feature_mean,
                                 feature_scale, sigma_percent)
        self.parts = torch.nn.ModuleDict({part.part: part(context) for part in spec.part_types()})
        self._full: dict[CallLayout, float] = {}
        self._plain: dict[CallLayout, float] = {}
        # keep only each block's inputs for backward and recompute the rest (set by the trainer for a run)
        self.gradient_checkpointing = False

    def __getitem__(self, name: str) -> TrainablePart:
        return self.parts[name]

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def learns_compute(self) -> bool:
        """Whether training decides the FLOPs (width routers, keep ratios); coarse steps are fixed by their schedule."""
        return any(part.learns_compute for part in self.parts.values())

    # --- model calls ------------------------------------------------------------------------------
    def latent(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return inputs[self.adapter.latent_argument]

    def timestep(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return inputs[self.adapter.timestep_argument]

    def arguments(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The recorded model-call arguments of a batch (by the host's parameter names), with the ones the adapter
        derives from them."""
        tensors = {k: v for k, v in inputs.items() if k not in TRAINER_KEYS}
        return {**tensors, **self.adapter.derived_arguments(tensors)}

    def call(self, inputs: Mapping[str, torch.Tensor], **options: Any) -> StudentCall:
        """A prepared call over `inputs`: every part's decisions made."""
        arguments = self.arguments(inputs)
        call = StudentCall(inputs, arguments, self.adapter.call_layout(arguments), **options)
        for part in self.parts.values():
            part.prepare(call)
        return call

    def forward(self, inputs: Mapping[str, torch.Tensor], temperature: float = 1.0, noise: float = 1.0,
                generator: torch.Generator | None = None, record_blocks: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's model output for a batch of recorded model inputs, and its (B,) FLOPs ratios."""
        with self.host_training():  # the host's code paths autograd can go through
            call = self.call(inputs, temperature=temperature, noise=noise, generator=generator, record=record_blocks)
            for part in self.parts.values():
                taken = part.forward_call(self, call)
                if taken is not None:
                    return taken
            return self.run_model(call), self.call_ratio(call)

    def run_model(self, call: StudentCall, arguments: Mapping[str, Any] | None = None,
                  options: Callable[[dict], dict] = lambda options: options) -> torch.Tensor:
        """The host model on the call's arguments (or `arguments`), every block through the parts."""
        patches = {self.adapter.patch_key(b): self._block_patch(call, i, b) for i, b in enumerate(self.blocks)}
        transformer_options = options({"patches_replace": {"dit": patches}, "sigmas": call.sigmas})
        return self.diffusion_model(**(call.arguments if arguments is None else arguments), transformer_options=transformer_options)

    def _block_patch(self, call: StudentCall, position: int, block: BlockRef) -> Callable[[dict, dict], dict]:
        parts = list(self.parts.values())
        adapted = sorted({name for part in parts for name in part.linears(block)})

        def override(name: str) -> Callable[[torch.nn.Module], Callable]:
            def build(layer: torch.nn.Module) -> Callable:
                pieces = LinearPieces()
                for part in parts:
                    part.adapt_linear(call, position, block, name, layer, pieces)
                return AdaptedLinear(layer, pieces)
            return build

        internals = BlockInternals(linear_overrides={name: override(name) for name in adapted})

        def patch(args: dict, extra: dict) -> dict:
            module = self.adapter.block_module(self.diffusion_model, block)
            layout = call.layout = self.adapter.block_layout(block, args, call.layout)

            def run(block_args: Mapping[str, Any]) -> dict:
                return self.adapter.run_block(module, block, block_args, internals, [], layout, call.cache)

            training = torch.is_grad_enabled()  # decided here: a checkpointed block runs its forward without autograd
            for part in parts:
                part.enter_block(call, position)
            block_call = run
            for part in reversed(parts):  # the first part outermost
                block_call = (lambda inner, part: lambda block_args: part.wrap_block(
                    call, position, block, block_args, inner, training))(block_call, part)
            if self.gradient_checkpointing and training:
                out = checkpointed(block_call, args, call.decisions, self.host_training)
            else:
                out = block_call(args)
            if call.record is not None:
                call.record.append(self.adapter.hidden_states(block, out))
            for part in parts:
                part.after_block(call, position, block, args, out)
            return out

        return patch

    # --- FLOPs --------------------------------------------------------------------------------------
    def block_flops(self, block: BlockRef, work: Any) -> float:
        """A block call's FLOPs with what every part adds to it."""
        extra = sum(part.extra_flops(block, work) for part in self.parts.values())
        return self.adapter.block_flops(block, replace(work, extra_flops=extra)).total

    def full_flops(self, layout: CallLayout) -> float:
        """The unpatched model's FLOPs of one sample of a call of `layout`."""
        one = replace(layout, batch=1)
        found = self._full.get(one)
        if found is None:
            found = self._full[one] = self.adapter.full_flops(one).total
        return found

    def plain_ratio(self, layout: CallLayout) -> float:
        """A call's FLOPs ratio per sample at full width and every token (the parts' additions included)."""
        one = replace(layout, batch=1)
        found = self._plain.get(one)
        if found is not None:
            return found
        total = self.adapter.stem_flops(one).total + sum(self.block_flops(b, self.adapter.full_block_work(b, one)) for b in self.blocks)
        found = self._plain[one] = total / self.full_flops(one)
        return found

    def call_ratio(self, call: StudentCall) -> torch.Tensor:
        """(B,) FLOPs ratios of a call no part runs its own way: the deciding part's, else the plain ratio."""
        for part in self.parts.values():
            ratio = part.call_ratio(self, call)
            if ratio is not None:
                return ratio
        return torch.tensor(self.plain_ratio(call.layout)).expand(call.layout.batch)

    def run_ratio(self, bank: Trajectories, **decision: Any) -> Any:
        """The FLOPs ratio of a sampling run of the bank's schedule (`decision`: noise, temperature, generator,
        grad); with noise 0 the deterministic decisions inference makes."""
        for part in self.parts.values():
            ratio = part.run_ratio(self, bank, **decision)
            if ratio is not None:
                return ratio
        rows = bank.fixed(1)
        ratio = self.plain_ratio(self.adapter.call_layout(self.arguments(rows)))
        return torch.tensor(ratio) if decision.get("grad") else ratio

    # --- the rows a run learns from ----------------------------------------------------------------------
    def training_rows(self, bank: Trajectories) -> Trajectories:
        for part in self.parts.values():
            bank = part.training_rows(bank)
        return bank

    def changed_timesteps(self, bank: Trajectories) -> list[float] | None:
        """The timesteps of the bank's schedule whose calls the student changes, or None for every call."""
        for part in self.parts.values():
            timesteps = part.changed_timesteps(bank)
            if timesteps is not None:
                return timesteps
        return None

    def decision_parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.parts.values() for p in part.decision_parameters()]

    def after_step(self) -> None:
        for part in self.parts.values():
            part.after_step()


__all__ = ["DynamicStudent", "StudentCall", "StudentContext", "StudentSpec"]
