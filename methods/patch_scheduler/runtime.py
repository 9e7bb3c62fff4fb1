"""Dynamic patch scheduling (DDiT, arXiv 2602.16968): coarse patches at steps where the latent changes slowly.

The reasoning and the equations: docs/methods/patch_scheduler.md.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ...families import UnsupportedModelError
from ...core.flops import FlopBreakdown
from ...core.method import BlockArgs, BlockFn, DynamicMethod, register
from .coarse_path import (
    FlowStep, NoiseStep, as_image, pad_to_multiple, spatially, coarse_layer_flops, coarse_output, coarse_time, coarse_tokens,
)
from ...core.low_rank import GatedBypass, SummedExtra
from .file import CoarseLayers
from .schedule import range_of_step
from .statistics import PatchDecision, choose_patch_factor, relative_roughness, roughness
from .settings import PatchSchedulerSettings

if TYPE_CHECKING:
    from ...families import BlockInternals, BlockRef
    from ...families.coarse import CoarseGrid
    from ...core.executor import CallState, ModelCall, RunContext

MIN_FLOW_TIME = 1e-3  # the velocity divides by t: closer to the clean end a coarse step makes no sense
# COARSE_WINDOW_RULE: Δ³ is measured over native steps only. A coarse step's update is not the model's
# own motion (detail finer than a coarse patch is carried along, not predicted): on the reference model
# the ratio of the three windows holding it jumps to 2.2-8.8 under Euler and 1.1-5.7 under DPM++ 2M,
# values native steps reach only late in a run (BENCHMARKS.md). Compared with tau, that jump either
# blocked the next coarse step or let coarse steps chain into long runs (x2.7 fewer FLOPs at 17 dB).
# So a window holding a coarse step decides nothing: its step runs native, coarse steps come at most
# every fourth step, each after three native steps that re-form the detail.


# --- the runtime -----------------------------------------------------------------------------------
@dataclass
class _Capture:
    """Hidden states after the last block of one trained coarse call."""

    call: "CallState"
    count: int  # coarse image tokens
    factor: int
    hidden: torch.Tensor | None = None
    conditioning: Any = None  # what the final layer is modulated by (the grid reads it off the last block)


@register
class PatchSchedulerMethod(DynamicMethod):
    settings_type = PatchSchedulerSettings
    order = 10
    settings: PatchSchedulerSettings

    def __init__(self, settings: PatchSchedulerSettings, run: "RunContext") -> None:
        super().__init__(settings, run)
        grid = run.adapter.coarse_grid()
        if grid is None:  # settings are validated when applied, so only a changed model gets here
            raise UnsupportedModelError(f"The patch scheduler does not support {run.adapter.display_name} models yet.")
        self.grid: "CoarseGrid" = grid
        self._sampling_refusal = grid.sampling_refusal(run.model_sampling)  # on the host, once per run
        self._latents: OrderedDict[int, torch.Tensor] = OrderedDict()  # step -> sampler x at its start
        self._decisions: dict[int, PatchDecision] = {}
        self._reference: tuple[int, torch.Tensor] | None = None  # (step, its Δ³ statistics (factors, batch))
        self._coarse_steps: set[int] = set()  # steps with a call that ran coarse
        self._layers: dict[tuple, CoarseLayers] = {}
        self._capture: _Capture | None = None

    # --- scheduling -----------------------------------------------------------------------------
    def on_step(self, step: int, latent: torch.Tensor) -> None:
        if self.settings.mode != "auto":
            return
        self._latents[step] = as_image(latent.detach().to(torch.float32, copy=True))
        while len(self._latents) > 3:  # x_{s-3} .. x_{s-1}; x_s is the deciding call's own input
            self._latents.popitem(last=False)

    def decision(self, call: "CallState", model_call: "ModelCall") -> PatchDecision:
        """The decision of the step whose sigma this call evaluates, made by its first call."""
        step = call.step.step
        if step is None:
            return PatchDecision(1, "native (no step schedule)")
        if step not in self._decisions:
            self._decisions[step] = self._decide(call, model_call)
        return self._decisions[step]

    def _decide(self, call: "CallState", model_call: "ModelCall") -> PatchDecision:
        s, info = self.settings, call.step
        step = info.step
        if not s.start_percent <= info.percent <= s.end_percent:
            return PatchDecision(1, f"native (outside {s.start_percent:.0%}-{s.end_percent:.0%})")
        if s.mode == "manual":
            chosen = range_of_step(s.schedule, step, info.total_steps)
            if chosen is None:
                return PatchDecision(1, "native (no manual range)")
            if chosen.factor == 1:
                return PatchDecision(1, f"native (manual {chosen.span()})")
            return PatchDecision(chosen.factor, f"patch {chosen.factor}x (manual {chosen.span()})")
        if step < s.first_native_steps:
            return PatchDecision(1, f"native (first {s.first_native_steps} steps)")
        if step >= info.total_steps - s.last_native_steps:
            return PatchDecision(1, f"native (last {s.last_native_steps} steps)")
        history = [self._latents.get(i) for i in range(step - 3, step)]
        if any(z is None for z in history):
            return PatchDecision(1, "native (Δ³ needs the latents of the 3 steps before)")
        coarse = [i for i in range(step - 3, step) if i in self._coarse_steps]
        if coarse:  # see COARSE_WINDOW_RULE
            return PatchDecision(1, f"native (Δ³ window holds coarse step {coarse[-1]})")
        newest = self._newest_latent(call, model_call)
        if any(z.shape != newest.shape for z in history):
            return PatchDecision(1, "native (the latent changed size between steps)")
        factors = s.candidate_factors()
        values = roughness([*(z.to(newest.device) for z in history), newest], factors, self.grid.native_patch, s.epsilon)
        if self._reference is None:  # the yardstick: the first step evaluated, from native steps only
            self._reference = (step, values)
        # The step's one device -> host read (auto mode only): its relative statistics.
        relative = relative_roughness(values, self._reference[1]).double().tolist()
        return choose_patch_factor(dict(zip(factors, relative)), s.tau, s.epsilon, self._reference[0])

    def _newest_latent(self, call: "CallState", model_call: "ModelCall") -> torch.Tensor:
        """x_s: the sampler's x of this call at full precision where the host hands it over (else the
        model's input, the same x for Flux up to the cast), the rows of one cond/uncond chunk."""
        x = call.sampler_x if call.sampler_x is not None else self.run.adapter.latent(model_call.arguments)
        rows = call.chunks[0].rows if call.chunks else slice(None)
        return as_image(x[rows, : self.grid.noisy_channels].float())

    # --- model calls ----------------------------------------------------------------------------
    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        decision = self.decision(call, model_call)
        reason = decision.reason
        factor = decision.factor
        if factor > 1:
            refusal = (self._sampling_refusal or self.grid.refusal(model_call.arguments, call.diffusion_model)
                       or self.grid.factor_refusal(model_call.arguments, factor))
            if refusal is None and call.step.sigma < MIN_FLOW_TIME:  # the host's sigma: no device read
                refusal = f"sigma {call.step.sigma:.2g} is too close to the clean end"
            if refusal is not None:
                factor, reason = 1, f"native ({refusal}; planned {decision.factor}x)"
        call.record.methods[self.name] = reason
        if factor == 1:
            return proceed(model_call)
        self._coarse_steps.add(call.step.step)
        layers = self._coarse_layers(factor, self.run.adapter.latent(model_call.arguments))
        if layers is None:
            return self._training_free_call(model_call, proceed, factor)
        return self._trained_call(call, model_call, proceed, factor, self.grid.flow_time(model_call.arguments), layers)

    def _training_free_call(self, model_call: "ModelCall", proceed: Callable, factor: int) -> torch.Tensor:
        grid, adapter = self.grid, self.run.adapter
        x = adapter.latent(model_call.arguments)
        low = spatially(lambda y: F.avg_pool2d(pad_to_multiple(y, factor * grid.native_patch), factor), x.float())
        step = (NoiseStep if grid.prediction == "noise" else FlowStep)(grid, model_call.arguments, self.run.model_sampling)
        z, time = step.coarse(low, factor)
        options = grid.coarse_options(model_call.transformer_options, factor)
        out = proceed(model_call.with_transformer_options(options, **{adapter.latent_argument: z.to(x.dtype), **time})
                      .while_running(partial(grid.coarse_call, factor, model_call.arguments, x, z)))
        return step.native(x, z, out, factor)

    def _trained_call(self, call: "CallState", model_call: "ModelCall", proceed: Callable, factor: int,
                      t: torch.Tensor, layers: CoarseLayers) -> torch.Tensor:
        grid, adapter = self.grid, self.run.adapter
        x = adapter.latent(model_call.arguments)
        tokens, placeholder = coarse_tokens(grid, x, layers, factor, t)
        options = grid.coarse_options(
            model_call.transformer_options, factor, post_input=lambda embedded: grid.replace_image_tokens(embedded, tokens)
        )
        self._capture = capture = _Capture(call, tokens.shape[1], factor)
        try:
            out = proceed(model_call.with_transformer_options(options, **{
                adapter.latent_argument: placeholder, **grid.with_flow_time(model_call.arguments, coarse_time(t, factor)[1]),
            }))
        finally:
            self._capture = None
        if capture.hidden is None:
            raise RuntimeError(
                f"Patch scheduler: block {grid.last_block.label} did not run through Dynamic DiT's block patch, so the "
                "hidden states for the trained de-embedding are missing (another node replaced the model's blocks?)."
            )
        call.add_executed(FlopBreakdown(extra=coarse_layer_flops(grid, x, layers, factor)))
        return coarse_output(grid, call.diffusion_model, capture.hidden, capture.conditioning, layers, x, factor, t).to(out.dtype)

    def block_internals(self, call: "CallState", block: "BlockRef", args: BlockArgs, internals: "BlockInternals") -> "BlockInternals":
        """The file's block LoRA (format version 2) on the linears of a trained coarse call, and only there."""
        capture = self._capture
        if capture is None or capture.call is not call:
            return internals
        embedding = self.settings.embedding
        lora = embedding.lora.get(capture.factor, {}).get(block.label) if embedding is not None else None
        if not lora:
            return internals
        like = self.run.adapter.hidden_states(block, args)
        extras = dict(internals.extras)
        for name, (down, up) in lora.items():
            bypass = GatedBypass(*self._cast_lora(down, up, like), None)
            extras[name] = SummedExtra(extras[name], bypass) if name in extras else bypass
        return internals.with_changes(extras=extras)

    def _cast_lora(self, down: torch.Tensor, up: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(down), like.device, like.dtype)
        if key not in self._layers:
            self._layers[key] = (down.to(like), up.to(like))
        return self._layers[key]

    def wrap_block(self, call: "CallState", block: "BlockRef", args: BlockArgs, proceed: BlockFn) -> dict:
        capture = self._capture
        out = proceed(args)
        if capture is not None and capture.call is call and block == self.grid.last_block:
            capture.hidden = self.grid.image_hidden(block, out, call.layout, capture.count)
            capture.conditioning = self.grid.final_conditioning(args)
        return out

    def _coarse_layers(self, factor: int, like: torch.Tensor) -> CoarseLayers | None:
        embedding = self.settings.embedding
        if embedding is None:
            return None
        key = (factor, like.device, like.dtype)
        if key not in self._layers:
            self._layers[key] = embedding.layers[factor].to(like)
        return self._layers[key]

    def finish(self) -> None:
        self._latents.clear()
        self._reference = None
        self._coarse_steps.clear()
        self._layers.clear()
        self._capture = None


__all__ = ["PatchSchedulerMethod"]
