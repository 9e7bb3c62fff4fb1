"""Dynamic patch scheduling (DDiT, arXiv 2602.16968): coarse patches at steps where the latent changes slowly.

At a coarse step with factor f the model runs on a grid f times coarser in each direction (patch f*p,
f*f times fewer image tokens) and the prediction is brought back to the native latent resolution.
Everything happens around one model call (model level, outermost method), so the token router and
the width patcher run on the coarse grid inside it.

**Without a trained file** (training-free), a coarse call is the host's own forward on an
area-downsampled latent, which is the same as embedding each f*p patch with the native `img_in`
weights times the area-downsampling matrix (the transpose of the downsampling, up to 1/f^2). The
FlexiViT alternative, the pseudo-inverse of the bilinear resize (PI-resize), embeds B+ x instead:
a least-squares downsampling with negative lobes that leaves the per-pixel noise coloured and at
0.65 (f=2) / 0.32 (f=4) of its std instead of exactly 1/f. Area downsampling keeps the noise white
with std exactly t/f, so the coarse latent is an exact flow-matching sample of the downsampled clean
latent at a shifted time (the resolution shift of SD3, section 5.3.2):

    D x_t = (1 - t) D x0 + (t / f) n   ==   c * ((1 - t') D x0 + t' n),   c = 1 - t + t/f,   t' = (t/f) / c

so the model sees the noise level it was trained for: `z = D x_t / c` at flow time t'. PI-resize
cannot give that, so area it is (`patch_embedding_file.derived_layers` still builds the PI-resize
layers, as DDiT's initialisation for a trainer).

Positions: coarse token i gets the RoPE position of the centre of the native tokens it covers,
f*i + (f-1)/2 (through the host's `rope_options`; `CoarseGrid.coarse_options`).

Back to native: the coarse denoised estimate x0_c = z - t' v_c is upsampled bilinearly (U) and the
velocity is taken against the full-resolution input: v = (x_t - U x0_c) / t, i.e.

    v = U((D x_t - x0_c) / t)  +  (x_t - U D x_t) / t
        coarse prediction          residual path from the input latent

The residual carries the detail finer than a coarse patch straight from the input: it is what the
velocity of that detail is when the clean image has none at that scale (exact at early steps, where
that detail is noise). **With a trained file** the trained embedding (plus the patch-size identifier)
replaces the embedded image tokens through the host's `post_input` patch, the hidden states after
the last block are captured by this method's `wrap_block`, and the host's final layer (its own norm
and modulation) runs with the trained de-embedding as last linear; the same residual path is added.
Block LoRA is left to TD-LoRA's machinery (another method), so files do not carry it yet.

**Scheduler** (auto mode, DDiT's rule): the sampler's x at the start of every step is recorded from
the per-step callback; the decision for step s uses the third difference of x_{s-4} ... x_{s-1},
the four latest step latents (the callback of step s fires only after its first model call). For
each candidate patch size the std inside each patch (around each channel's own mean, so that only
spatial variation counts), then the epsilon-percentile over patches; the largest patch whose value
is below tau wins. One factor per step for the whole batch: the most conservative sample decides.
The first three steps and the last N steps run native. Every call of a step uses the decision of the step whose sigma it evaluates (`call.step.step`): Heun's second
evaluation of step i, at sigma_{i+1}, runs at step i+1's patch size, made from x_{i-3} ... x_i.
**Manual mode** takes a schedule such as `0-40%:4, 40-70%:2, 70-100%:1` over the fraction of the
run's steps done (step s of N at s/N); steps no range covers run native.
Calls whose inputs are laid out per native token (ControlNet, attention masks, 'uxo' reference
latents) always run native.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..adapters import UnsupportedModelError
from ..flops import FlopBreakdown, linear_flops
from ..plan import MethodSettings
from .base import BlockArgs, BlockFn, DynamicMethod, register
from .patch_embedding_file import FACTORS, CoarseLayers, PatchEmbeddingFile

if TYPE_CHECKING:
    from ..adapters import BlockRef, ModelAdapter
    from ..adapters.coarse import CoarseGrid
    from ..executor import CallState, ModelCall, RunContext
    from ..steps import StepInfo

MODES = ("auto", "manual")
FIRST_NATIVE_STEPS = 3
MIN_FLOW_TIME = 1e-3  # the velocity divides by t: closer to the clean end a coarse step makes no sense


# --- manual schedules -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScheduleRange:
    start: float  # percent of the run's steps, inclusive
    end: float  # percent, exclusive
    factor: int

    def describe(self) -> str:
        return f"{self.start:g}-{self.end:g}%:{self.factor}x"


_RANGE = re.compile(r"^(?P<start>\d+(?:\.\d*)?)\s*%?\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*%?\s*:\s*(?P<factor>\d+)\s*x?$", re.IGNORECASE)


def parse_schedule(text: str) -> tuple[ScheduleRange, ...]:
    """Parse a manual schedule such as `0-40%:4, 40-70%:2, 70-100%:1` (items split by , ; or newlines)."""
    items = [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]
    if not items:
        raise ValueError("The manual patch schedule is empty; write ranges such as '0-40%:4, 40-70%:2, 70-100%:1'.")
    ranges = []
    for item in items:
        match = _RANGE.match(item)
        if match is None:
            raise ValueError(
                f"Cannot read '{item}' in the manual patch schedule; each range is start-end%:factor, e.g. '0-40%:4'."
            )
        start, end, factor = float(match["start"]), float(match["end"]), int(match["factor"])
        if not 0 <= start < end <= 100:
            raise ValueError(f"'{item}' in the manual patch schedule: ranges go from 0 to 100% and start before they end.")
        if factor not in (1, *FACTORS):
            raise ValueError(f"'{item}' in the manual patch schedule: the patch factor must be 1 (native), 2 or 4, not {factor}.")
        ranges.append(ScheduleRange(start, end, factor))
    ranges.sort(key=lambda r: r.start)
    for before, after in zip(ranges, ranges[1:]):
        if after.start < before.end:
            raise ValueError(f"The manual patch schedule has overlapping ranges: {before.describe()} and {after.describe()}.")
    return tuple(ranges)


def schedule_range_at(schedule: Sequence[ScheduleRange], percent: float) -> ScheduleRange | None:
    return next((r for r in schedule if r.start <= percent < r.end), None)


# --- the DDiT scheduler, as pure functions --------------------------------------------------------
@dataclass(frozen=True)
class PatchDecision:
    factor: int  # 1 = native
    reason: str  # what telemetry shows for the step
    statistics: Mapping[int, float] = field(default_factory=dict)  # factor -> Δ³ statistic that was compared with tau


def third_difference(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Δ³z of four consecutive step latents, oldest first (exactly zero for a quadratic trajectory)."""
    z0, z1, z2, z3 = (z.double() for z in latents)
    return z3 - 3 * z2 + 3 * z1 - z0


def patch_statistic(delta: torch.Tensor, patch: int, epsilon: float) -> torch.Tensor:
    """Per sample: the epsilon-percentile over patch x patch regions of the std inside each region.

    `delta` is (B, C, H, W). The std inside a region is taken around each channel's own mean there
    (pooled over channels): a change that is uniform over the region in every channel is exactly what
    one coarse token can carry, however different the channels are. Regions cut off at the right and
    bottom edge count only their pixels.
    """
    batch, channels, height, width = delta.shape
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    pad = (0, cols * patch - width, 0, rows * patch - height)
    values = F.pad(delta.double(), pad)
    present = F.pad(torch.ones(1, 1, height, width, dtype=torch.float64, device=delta.device), pad)

    def per_region(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, regions)
        return t.reshape(t.shape[0], t.shape[1], rows, patch, cols, patch).sum(dim=(3, 5)).reshape(t.shape[0], t.shape[1], -1)

    count = per_region(present)
    mean = per_region(values) / count
    variance = (per_region(values * values) / count - mean * mean).clamp_min(0).mean(dim=1)
    return torch.quantile(variance.sqrt(), epsilon, dim=1)


def choose_patch_factor(
    latents: Sequence[torch.Tensor],
    factors: Sequence[int],
    native_patch: int,
    tau: float,
    epsilon: float,
) -> PatchDecision:
    """DDiT's rule: the largest factor whose Δ³ statistic is below tau (the worst sample of the batch counts)."""
    delta = third_difference(latents)
    label = f"p{epsilon * 100:g}"
    statistics = {
        factor: float(patch_statistic(delta, factor * native_patch, epsilon).max()) for factor in sorted(factors)
    }
    passing = [factor for factor, value in statistics.items() if value < tau]
    if passing:
        factor = max(passing)
        return PatchDecision(factor, f"patch {factor}x (Δ³ {label} = {statistics[factor]:.2g} < τ {tau:g})", statistics)
    values = ", ".join(f"{factor}x {value:.2g}" for factor, value in statistics.items())
    return PatchDecision(1, f"native (Δ³ {label}: {values} ≥ τ {tau:g})", statistics)


# --- settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchSchedulerSettings(MethodSettings):
    method: ClassVar[str] = "patch_scheduler"

    mode: str = "auto"
    tau: float = 0.001
    epsilon: float = 0.4  # the percentile over patches, as a fraction
    max_factor: int = 4
    last_native_steps: int = 2
    schedule: tuple[ScheduleRange, ...] = ()  # manual mode
    embedding: PatchEmbeddingFile | None = None
    start_percent: float = 0.0  # sigma-based, as ComfyUI's start/end percent
    end_percent: float = 1.0
    first_native_steps: int = FIRST_NATIVE_STEPS

    def candidate_factors(self) -> tuple[int, ...]:
        """Coarse factors auto mode may choose."""
        available = self.embedding.factors if self.embedding is not None else FACTORS
        return tuple(f for f in available if f <= self.max_factor)

    @property
    def enabled(self) -> bool:
        if self.start_percent >= self.end_percent:
            return False
        if self.mode == "manual":
            return any(r.factor > 1 for r in self.schedule)
        return self.tau > 0 and bool(self.candidate_factors())

    def validate(self, adapter: "ModelAdapter") -> None:
        if self.mode not in MODES:
            raise ValueError(f"Patch scheduler mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"Patch scheduler tau must be a finite number >= 0, not {self.tau}.")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"Patch scheduler percentile must be between 0 and 1, not {self.epsilon}.")
        if self.max_factor not in (1, *FACTORS):
            raise ValueError(f"Patch scheduler max patch factor must be 1, 2 or 4, not {self.max_factor}.")
        if self.last_native_steps < 0 or self.first_native_steps < 0:
            raise ValueError("Patch scheduler: the number of native steps at the start and end cannot be negative.")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"Patch scheduler start/end percent must satisfy 0 <= start <= end <= 1, got {self.start_percent}, {self.end_percent}."
            )
        if self.mode == "manual" and not self.schedule:
            raise ValueError("Patch scheduler: manual mode needs a schedule such as '0-40%:4, 40-70%:2, 70-100%:1'.")
        grid = adapter.coarse_grid()
        if grid is None:
            raise UnsupportedModelError(f"The patch scheduler does not support {adapter.display_name} models yet.")
        if self.embedding is None:
            return
        self.embedding.check_model(grid, adapter.display_name)
        factors = self.embedding.factors
        if self.mode == "manual":
            missing = sorted({r.factor for r in self.schedule if r.factor > 1} - set(factors))
            if missing:
                raise ValueError(
                    f"The manual patch schedule asks for {', '.join(f'{f}x' for f in missing)} patches, but the embedding "
                    f"'{self.embedding.name}' holds only {', '.join(f'{f}x' for f in factors)}."
                )
        elif not self.candidate_factors():
            raise ValueError(
                f"The embedding '{self.embedding.name}' holds {', '.join(f'{f}x' for f in factors)} patches, all above the "
                f"max patch factor {self.max_factor}."
            )

    def describe(self) -> str:
        if self.mode == "manual":
            text = f"patch scheduler (manual {', '.join(r.describe() for r in self.schedule)})"
        else:
            text = (f"patch scheduler (auto, τ {self.tau:g}, p{self.epsilon * 100:g}, up to "
                    f"{max(self.candidate_factors(), default=1)}x, last {self.last_native_steps} native)")
        if self.embedding is not None:
            text += f" with {self.embedding.name}"
        return text


# --- the runtime -----------------------------------------------------------------------------------
@dataclass
class _Capture:
    """Hidden states after the last block of one trained coarse call."""

    call: "CallState"
    count: int  # coarse image tokens
    hidden: torch.Tensor | None = None
    vec: torch.Tensor | None = None


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
        self._layers: dict[tuple, CoarseLayers] = {}
        self._capture: _Capture | None = None

    # --- scheduling -----------------------------------------------------------------------------
    def on_step(self, step: int, latent: torch.Tensor) -> None:
        if self.settings.mode != "auto":
            return
        self._latents[step] = latent.detach().to(torch.float32, copy=True)
        while len(self._latents) > 4:
            self._latents.popitem(last=False)

    def decision(self, step: "StepInfo") -> PatchDecision:
        if step.step is None:
            return PatchDecision(1, "native (no step schedule)")
        if step.step not in self._decisions:
            self._decisions[step.step] = self._decide(step)
        return self._decisions[step.step]

    def _decide(self, info: "StepInfo") -> PatchDecision:
        s, step = self.settings, info.step
        if not s.start_percent <= info.percent <= s.end_percent:
            return PatchDecision(1, f"native (outside {s.start_percent:.0%}-{s.end_percent:.0%})")
        if s.mode == "manual":
            position = 100.0 * step / max(info.total_steps, 1)
            chosen = schedule_range_at(s.schedule, position)
            if chosen is None:
                return PatchDecision(1, "native (no manual range)")
            text = f"patch {chosen.factor}x" if chosen.factor > 1 else "native"
            return PatchDecision(chosen.factor, f"{text} (manual {chosen.start:g}-{chosen.end:g}%)")
        if step < s.first_native_steps:
            return PatchDecision(1, f"native (first {s.first_native_steps} steps)")
        if step >= info.total_steps - s.last_native_steps:
            return PatchDecision(1, f"native (last {s.last_native_steps} steps)")
        history = [self._latents.get(i) for i in range(step - 4, step)]
        if any(z is None for z in history):
            return PatchDecision(1, "native (Δ³ needs the latents of the 4 steps before)")
        return choose_patch_factor(history, s.candidate_factors(), self.grid.native_patch, s.tau, s.epsilon)

    # --- model calls ----------------------------------------------------------------------------
    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        decision = self.decision(call.step)
        reason = decision.reason
        factor = decision.factor
        if factor > 1:
            refusal = self._sampling_refusal or self.grid.refusal(model_call.arguments, call.diffusion_model)
            t = self.grid.flow_time(model_call.arguments)
            if refusal is None and call.step.sigma < MIN_FLOW_TIME:  # the host's sigma: no device read
                refusal = f"sigma {call.step.sigma:.2g} is too close to the clean end"
            if refusal is not None:
                factor, reason = 1, f"native ({refusal}; planned {decision.factor}x)"
        call.record.methods[self.name] = reason
        if factor == 1:
            return proceed(model_call)
        layers = self._coarse_layers(factor, model_call.arguments["x"])
        if layers is None:
            return self._training_free_call(model_call, proceed, factor, t)
        return self._trained_call(call, model_call, proceed, factor, t, layers)

    def _training_free_call(self, model_call: "ModelCall", proceed: Callable, factor: int, t: torch.Tensor) -> torch.Tensor:
        grid = self.grid
        x = model_call.arguments["x"]
        noisy = grid.noisy_channels
        low = F.avg_pool2d(_pad_to_multiple(x.float(), factor * grid.native_patch), factor)
        scale = 1.0 - t + t / factor  # D x_t = scale * ((1 - t') D x0 + t' noise)
        t_coarse = (t / factor) / scale
        z = low.clone()
        z[:, :noisy] = low[:, :noisy] / _rows(scale)
        options = grid.coarse_options(model_call.arguments["transformer_options"], factor)
        out = proceed(model_call.with_arguments(
            x=z.to(x.dtype), transformer_options=options, **grid.with_flow_time(model_call.arguments, t_coarse)
        ))
        denoised = z[:, :noisy] - _rows(t_coarse) * out.float()
        upsampled = _crop(F.interpolate(denoised, scale_factor=factor, mode="bilinear", align_corners=False), x)
        return ((x[:, :noisy].float() - upsampled) / _rows(t)).to(out.dtype)

    def _trained_call(self, call: "CallState", model_call: "ModelCall", proceed: Callable, factor: int,
                      t: torch.Tensor, layers: CoarseLayers) -> torch.Tensor:
        grid = self.grid
        x = model_call.arguments["x"]
        size = factor * grid.native_patch
        padded = _pad_to_multiple(x, size)
        rows, cols = padded.shape[-2] // size, padded.shape[-1] // size
        tokens = F.linear(grid.patchify(padded, size), layers.embed_weight, layers.embed_bias) + layers.patch_id
        placeholder = x.new_zeros(x.shape[0], x.shape[1], rows * grid.native_patch, cols * grid.native_patch)
        options = grid.coarse_options(
            model_call.arguments["transformer_options"], factor, post_input=lambda embedded: grid.replace_image_tokens(embedded, tokens)
        )
        self._capture = capture = _Capture(call, rows * cols)
        try:
            out = proceed(model_call.with_arguments(x=placeholder, transformer_options=options))
        finally:
            self._capture = None
        if capture.hidden is None:
            raise RuntimeError(
                f"Patch scheduler: block {grid.last_block.label} did not run through Dynamic DiT's block patch, so the "
                "hidden states for the trained de-embedding are missing (another node replaced the model's blocks?)."
            )
        deembedded = grid.final_layer(
            call.diffusion_model, capture.hidden, capture.vec, lambda h: F.linear(h, layers.deembed_weight, layers.deembed_bias)
        )
        batch, count = x.shape[0], rows * cols
        channels_in = x.shape[1]
        call.add_executed(FlopBreakdown(extra=(
            linear_flops(batch * count, channels_in * size * size, layers.embed_weight.shape[0])
            + linear_flops(batch * count, layers.deembed_weight.shape[1], layers.deembed_weight.shape[0])
            + grid.final_modulation_flops(batch)
        )))
        coarse = _crop(grid.unpatchify(deembedded, rows, cols, size), x).float()
        noisy = x[:, :grid.noisy_channels].float()
        smooth = _crop(F.interpolate(
            F.avg_pool2d(_pad_to_multiple(noisy, size), factor), scale_factor=factor, mode="bilinear", align_corners=False
        ), x)
        return (coarse + (noisy - smooth) / _rows(t)).to(out.dtype)

    def wrap_block(self, call: "CallState", block: "BlockRef", args: BlockArgs, proceed: BlockFn) -> dict:
        capture = self._capture
        out = proceed(args)
        if capture is not None and capture.call is call and block == self.grid.last_block:
            capture.hidden = self.grid.image_hidden(block, out, call.text_tokens, capture.count)
            capture.vec = args["vec"]
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
        self._layers.clear()
        self._capture = None


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.float().reshape(-1, 1, 1, 1)


def _pad_to_multiple(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad H and W up to multiples of `size` by repeating the edge pixels (a coarse patch must be whole)."""
    pad_h, pad_w = -x.shape[-2] % size, -x.shape[-1] % size
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def _crop(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y[..., : like.shape[-2], : like.shape[-1]]


__all__ = [
    "PatchDecision",
    "PatchSchedulerMethod",
    "PatchSchedulerSettings",
    "ScheduleRange",
    "choose_patch_factor",
    "parse_schedule",
    "patch_statistic",
    "third_difference",
]
