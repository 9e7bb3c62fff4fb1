"""Timestep-wise dynamic width (DyDiT TDW) with the compute really removed.

At noisy timesteps a DiT needs fewer attention heads and MLP channels, so every block's width
becomes a function of the timestep: one decision per model call (per sigma), shared by the batch,
made once for all blocks and cached per sigma for the run (Heun's second evaluation and separate
cond/uncond calls reuse it). The kept heads and MLP channel groups are run on sliced effective
weights (`adapter.run_block`), so the dropped ones cost nothing.

Two sources decide which units a block keeps:
- a trained router file (`WidthRouter`): per block one linear map of the model's own timestep
  embedding to head and group logits; a unit is kept where its logit is > 0;
- training-free: heads and groups ranked per block by their measured share of the block's output
  during a short deterministic calibration (`calibrate`), the top fraction given by a width
  schedule over the sampling progress.
Every block always keeps at least one head and one group.
"""
from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch

from ..adapters import BlockInternals, BlockRef, CallShape, ModelAdapter, UnsupportedModelError
from ..files import read_safetensors
from ..flops import FlopBreakdown, linear_flops
from ..plan import MethodSettings
from ..steps import invert_decreasing
from .base import BlockArgs, DynamicMethod, register

if TYPE_CHECKING:
    from ..executor import CallState, ModelCall, RunContext

logger = logging.getLogger("dynamic_dit")

# which parts a setting thins: (attention heads, MLP channel groups)
PARTS: dict[str, tuple[bool, bool]] = {"both": (True, True), "heads": (True, False), "mlp": (False, True)}


@dataclass(frozen=True)
class WidthPreset:
    noisy_width: float  # fraction of heads / groups kept at the start of the window (the noisiest step)
    clean_width: float  # ... at its end


# Linear ramps over the sampling progress; the start/end percent window of the node applies on top.
PRESETS: dict[str, WidthPreset] = {
    "quality": WidthPreset(0.75, 1.0),
    "balanced": WidthPreset(0.5, 1.0),
    "fast": WidthPreset(0.3, 0.9),
}


# --- router files --------------------------------------------------------------------------------
ROUTER_FORMAT = "dynamic_dit.width_router"
ROUTER_VERSION = 1
ROUTER_FEATURES = "time_in"  # the model's own timestep embedding, time_in(sinusoidal(t, 256))


@dataclass(frozen=True)
class RouterHeader:
    """What a width router file was made for; stored as safetensors header metadata (all strings)."""

    architecture: str  # adapter family, e.g. "flux"
    hidden_size: int
    num_heads: int
    mlp_hidden: int
    mlp_groups: int
    depths: tuple[tuple[str, int], ...]  # (block kind, count) by kind, e.g. (("double", 19), ("single", 38))
    features: str = ROUTER_FEATURES
    version: int = ROUTER_VERSION

    @classmethod
    def for_adapter(cls, adapter: ModelAdapter, mlp_groups: int | None = None) -> "RouterHeader":
        depths: dict[str, int] = {}
        for block in adapter.blocks:
            depths[block.kind] = depths.get(block.kind, 0) + 1
        return cls(
            architecture=adapter.family,
            hidden_size=int(adapter.arch.hidden_size),
            num_heads=adapter.head_count,
            mlp_hidden=adapter.mlp_hidden,
            mlp_groups=mlp_groups or adapter.head_count,
            depths=tuple(sorted(depths.items())),
        )

    @property
    def feature_dim(self) -> int:
        return self.hidden_size  # time_in maps to the hidden size

    def block_labels(self) -> list[str]:
        return [BlockRef(kind, i).label for kind, count in self.depths for i in range(count)]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for label in self.block_labels():
            for part, units in (("heads", self.num_heads), ("mlp", self.mlp_groups)):
                shapes[f"{label}.{part}.weight"] = (units, self.feature_dim)
                shapes[f"{label}.{part}.bias"] = (units,)
        return shapes

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": ROUTER_FORMAT,
            "version": str(self.version),
            "architecture": self.architecture,
            "hidden_size": str(self.hidden_size),
            "num_heads": str(self.num_heads),
            "mlp_hidden": str(self.mlp_hidden),
            "mlp_groups": str(self.mlp_groups),
            "features": self.features,
        }
        meta.update({f"depth_{kind}": str(count) for kind, count in self.depths})
        return meta

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], name: str) -> "RouterHeader":
        found = metadata.get("format")
        if found != ROUTER_FORMAT:
            what = f"its metadata 'format' is '{found}'" if found else "it has no 'format' metadata"
            raise ValueError(f"'{name}' is not a Dynamic DiT width router: {what}, expected '{ROUTER_FORMAT}'.")

        def integer(key: str) -> int:
            value = metadata.get(key)
            if value is None:
                raise ValueError(f"Width router '{name}': metadata '{key}' is missing.")
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"Width router '{name}': metadata '{key}' must be an integer, found '{value}'.") from None
            if number < 1 and not key.startswith("depth_"):
                raise ValueError(f"Width router '{name}': metadata '{key}' must be positive, found {number}.")
            return number

        version = integer("version")
        if version != ROUTER_VERSION:
            raise ValueError(
                f"Width router '{name}' has format version {version}; this pack reads version {ROUTER_VERSION}. "
                + ("Update the Dynamic DiT nodes." if version > ROUTER_VERSION else "Export the router again.")
            )
        features = metadata.get("features")
        if features != ROUTER_FEATURES:
            raise ValueError(f"Width router '{name}': features '{features}' are not supported (expected '{ROUTER_FEATURES}').")
        depths = tuple(sorted((key[len("depth_"):], integer(key)) for key in metadata if key.startswith("depth_")))
        if not depths or sum(count for _, count in depths) == 0:
            raise ValueError(f"Width router '{name}': no 'depth_<block kind>' metadata, so it routes no blocks.")
        header = cls(
            architecture=metadata.get("architecture", ""),
            hidden_size=integer("hidden_size"),
            num_heads=integer("num_heads"),
            mlp_hidden=integer("mlp_hidden"),
            mlp_groups=integer("mlp_groups"),
            depths=depths,
            features=features,
            version=version,
        )
        if header.mlp_hidden % header.mlp_groups:
            raise ValueError(
                f"Width router '{name}': {header.mlp_groups} MLP groups do not divide the {header.mlp_hidden} MLP hidden units."
            )
        return header

    def describe(self) -> str:
        blocks = " + ".join(f"{count} {kind}" for kind, count in self.depths)
        return (
            f"{self.architecture or 'unknown architecture'} with hidden size {self.hidden_size}, {self.num_heads} heads, "
            f"{self.mlp_hidden} MLP units, {blocks} blocks"
        )


class WidthRouter:
    """Per block, linear maps of the timestep features to head and MLP-group logits (keep where > 0).

    Tensors are validated (keys, shapes, dtypes, finite values) and kept stacked in float32 on the
    CPU; they are shared, never copied, by every clone of a patched model.
    """

    def __init__(self, header: RouterHeader, tensors: Mapping[str, torch.Tensor], name: str = "router"):
        self.header, self.name = header, name
        expected = header.expected_shapes()
        missing = [key for key in expected if key not in tensors]
        unexpected = sorted(key for key in tensors if key not in expected)
        if missing:
            raise ValueError(
                f"Width router '{name}': {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}; "
                f"a router for {header.describe()} has {len(expected)} tensors named '<block>.heads|mlp.weight|bias'."
            )
        if unexpected:
            raise ValueError(f"Width router '{name}': unexpected tensor(s) {', '.join(unexpected[:3])} for {header.describe()}.")
        for key, shape in expected.items():
            tensor = tensors[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"Width router '{name}': '{key}' has shape {tuple(tensor.shape)}, expected {shape}.")
            if not tensor.is_floating_point():
                raise ValueError(f"Width router '{name}': '{key}' has dtype {tensor.dtype}, expected a floating-point dtype.")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"Width router '{name}': '{key}' contains NaN or infinite values.")
        self.labels = header.block_labels()

        def stacked(part: str, kind: str) -> torch.Tensor:
            return torch.stack([tensors[f"{label}.{part}.{kind}"].detach().float().cpu() for label in self.labels])

        self.head_weight, self.head_bias = stacked("heads", "weight"), stacked("heads", "bias")
        self.group_weight, self.group_bias = stacked("mlp", "weight"), stacked("mlp", "bias")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for row, label in enumerate(self.labels):
            out[f"{label}.heads.weight"], out[f"{label}.heads.bias"] = self.head_weight[row], self.head_bias[row]
            out[f"{label}.mlp.weight"], out[f"{label}.mlp.bias"] = self.group_weight[row], self.group_bias[row]
        return {k: v.contiguous() for k, v in out.items()}

    def check(self, adapter: ModelAdapter) -> None:
        """Raise ValueError unless this router was made for the adapter's model."""
        mine = self.header
        model = RouterHeader.for_adapter(adapter, mine.mlp_groups)
        if (mine.architecture, mine.hidden_size, mine.num_heads, mine.mlp_hidden, dict(mine.depths)) != (
            model.architecture, model.hidden_size, model.num_heads, model.mlp_hidden, dict(model.depths)
        ):
            raise ValueError(
                f"Width router '{self.name}' was made for {mine.describe()}; this model is {model.describe()}. "
                "Use a router trained for this model."
            )

    @property
    def flops(self) -> float:
        """FLOPs of evaluating every block's router once."""
        rows = self.head_weight.shape[0] * (self.head_weight.shape[1] + self.group_weight.shape[1])
        return linear_flops(1, self.header.feature_dim, rows)


def save_width_router(path: str | Path, router: WidthRouter) -> None:
    from safetensors.torch import save_file

    save_file(router.tensors(), str(path), metadata=router.header.metadata())


def load_width_router(path: str | Path, name: str | None = None) -> WidthRouter:
    """Read and validate a width router file; every problem raises ValueError naming it."""
    name = name or Path(path).name
    tensors, metadata = read_safetensors(path, f"Width router '{name}'")
    return WidthRouter(RouterHeader.from_metadata(metadata, name), tensors, name)


# --- settings ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSpec:
    """The deterministic synthetic input of the training-free ranking (see `calibrate`)."""

    percents: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # sampling progress of the measured points
    latent_size: tuple[int, int] = (32, 32)  # latent height, width (Flux: 16x16 = 256 image tokens)
    text_tokens: int = 16
    guidance: float = 3.5  # guidance embedding value for guidance-distilled models (Flux dev's default)
    seed: int = 0


@dataclass(frozen=True)
class WidthSettings(MethodSettings):
    """Width of every block as a function of the sampling progress.

    Without a router the fraction of heads / groups kept ramps linearly from `noisy_width` at
    `start_percent` to `clean_width` at `end_percent`; with `target_flops` the ramp is solved per run
    so that the average FLOPs ratio of the run's steps meets the target. Outside the window every
    block runs at full width. A router replaces the schedule (the window still applies).
    """

    method: ClassVar[str] = "width"
    noisy_width: float = 0.5
    clean_width: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    parts: str = "both"  # "both", "heads" or "mlp"
    mlp_groups: int = 0  # MLP channel groups per block; 0 = one per attention head
    target_flops: float | None = None
    router: WidthRouter | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    def validate(self, adapter: ModelAdapter) -> None:
        if self.parts not in PARTS:
            raise ValueError(f"Dynamic width: parts must be one of {', '.join(PARTS)}, got '{self.parts}'.")
        for name in ("noisy_width", "clean_width"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"Dynamic width: {name} must be in (0, 1] (a fraction of the heads and groups), got {value}.")
        if not 0.0 <= self.start_percent < self.end_percent <= 1.0:
            raise ValueError(
                f"Dynamic width: need 0 <= start_percent < end_percent <= 1, got {self.start_percent} and {self.end_percent}."
            )
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise ValueError(f"Dynamic width: target_flops must be in (0, 1] (of the full model's FLOPs), got {self.target_flops}.")
        if self.router is not None and self.target_flops is not None:
            raise ValueError("Dynamic width: a router decides the widths itself; use either a router or a target FLOPs ratio.")
        if self.mlp_groups < 0:
            raise ValueError(f"Dynamic width: mlp_groups must be >= 0 (0 = one per head), got {self.mlp_groups}.")
        try:
            heads, mlp_hidden = adapter.head_count, adapter.mlp_hidden
        except NotImplementedError as exc:
            raise UnsupportedModelError(f"Dynamic width does not support this model: {exc}.") from None
        if self.router is not None:
            self.router.check(adapter)
            if self.mlp_groups and self.mlp_groups != self.router.header.mlp_groups:
                raise ValueError(
                    f"Dynamic width: the router '{self.router.name}' splits the MLP into {self.router.header.mlp_groups} "
                    f"groups, not {self.mlp_groups}; set mlp_groups to 0 to use the router's."
                )
        groups = self.group_count(adapter)
        if groups > mlp_hidden or mlp_hidden % groups:
            raise ValueError(
                f"Dynamic width: {groups} MLP groups must divide the model's {mlp_hidden} MLP hidden units "
                f"(e.g. {heads}, the number of heads)."
            )
        spec = self.calibration
        if not spec.percents or any(not 0.0 <= p < 1.0 for p in spec.percents) or list(spec.percents) != sorted(set(spec.percents)):
            raise ValueError(f"Dynamic width: calibration percents must increase within [0, 1), got {spec.percents}.")

    def group_count(self, adapter: ModelAdapter) -> int:
        if self.router is not None:
            return self.router.header.mlp_groups
        return self.mlp_groups or adapter.head_count

    @property
    def enabled(self) -> bool:
        if self.router is not None:
            return True
        if self.target_flops is not None:
            return self.target_flops < 1.0
        return min(self.noisy_width, self.clean_width) < 1.0

    def in_window(self, percent: float) -> bool:
        return self.start_percent <= percent <= self.end_percent

    def describe(self) -> str:
        parts = {"both": "heads+MLP", "heads": "heads", "mlp": "MLP"}[self.parts]
        if self.router is not None:
            how = f"router {self.router.name}"
        elif self.target_flops is not None:
            how = f"target FLOPs {self.target_flops:.2f}"
        else:
            how = f"{self.noisy_width:.2f}->{self.clean_width:.2f}"
        window = "" if (self.start_percent, self.end_percent) == (0.0, 1.0) else f" in {self.start_percent:.0%}-{self.end_percent:.0%}"
        return f"width {parts} {how}{window}"


def ramp(noisy: float, clean: float, settings: WidthSettings, percent: float) -> float:
    """Fraction kept at `percent`: a linear ramp inside the window, full width outside it."""
    if not settings.in_window(percent):
        return 1.0
    t = (percent - settings.start_percent) / (settings.end_percent - settings.start_percent)
    return noisy + (clean - noisy) * t


def kept_count(fraction: float, units: int) -> int:
    """Units kept for a width fraction: rounded half up, at least one."""
    return min(units, max(1, math.floor(fraction * units + 0.5)))


# --- training-free ranking -----------------------------------------------------------------------
@dataclass(frozen=True)
class WidthRanking:
    """Per calibration point and block: heads and MLP groups, largest measured contribution first."""

    percents: tuple[float, ...]
    heads: tuple[tuple[tuple[int, ...], ...], ...]  # [point][block] -> head indices
    groups: tuple[tuple[tuple[int, ...], ...], ...]
    seconds: float
    flops: float

    def point(self, percent: float) -> int:
        """The calibration point nearest to `percent` (ties go to the noisier one)."""
        return min(range(len(self.percents)), key=lambda i: (abs(self.percents[i] - percent), i))


def _order(scores: torch.Tensor) -> tuple[int, ...]:
    values = scores.tolist()
    return tuple(sorted(range(len(values)), key=lambda u: (-values[u], u)))


class _Probes(dict):
    """`patches_replace["dit"]` entries that measure every block's units while running it."""

    def __init__(self, run: "RunContext", diffusion_model: torch.nn.Module, groups: int):
        super().__init__()
        self.blocks = run.adapter.blocks
        self.scores: dict[BlockRef, tuple[torch.Tensor, torch.Tensor]] = {}
        adapter = run.adapter
        for block in self.blocks:
            module = adapter.block_module(diffusion_model, block)

            def probe(args: dict, extra: dict, block: BlockRef = block, module: torch.nn.Module = module) -> dict:
                out, heads, groups_ = adapter.measure_units(module, block, args, groups, run.weight_source)
                self.scores[block] = (heads, groups_)
                return out

            self[adapter.patch_key(block)] = probe

    def orders(self, part: int) -> tuple[tuple[int, ...], ...]:
        """Per block (in execution order): units by measured share, largest first (ties: lower index)."""
        missing = [b.label for b in self.blocks if b not in self.scores]
        if missing:
            raise RuntimeError(f"Dynamic width: calibration did not reach blocks {', '.join(missing)}.")
        scores = torch.stack([self.scores[block][part] for block in self.blocks]).cpu()  # one read for all blocks
        return tuple(_order(row) for row in scores)


def calibrate(
    run: "RunContext", diffusion_model: torch.nn.Module, like: torch.Tensor, spec: CalibrationSpec, groups: int
) -> WidthRanking:
    """Rank every block's heads and MLP groups by their share of the block's output.

    The input depends on nothing but the model and `spec`: seeded noise (a CPU generator, so the
    device does not matter) sampled with the full model and neutral conditioning (empty text, as
    ConditioningZeroOut gives) by Euler steps through the sigmas of `spec.percents`, measured at each
    of them. The same weights therefore always give the same ranking, whatever ran before.
    """
    adapter, sampling = run.adapter, run.model_sampling
    if sampling is None or run.percent_to_sigma is None:
        raise RuntimeError("Dynamic width: calibration needs the host's model sampling; the run did not provide it.")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed)
    height, width = spec.latent_size
    noise = torch.randn(1, adapter.output_channels, height, width, generator=generator).to(like.device)
    sigmas = [float(run.percent_to_sigma(p)) for p in spec.percents]
    x = sampling.noise_scaling(_sigma(sigmas[0], noise), noise, torch.zeros_like(noise))
    head_orders, group_orders, flops = [], [], 0.0
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            s = _sigma(sigma, noise)
            probes = _Probes(run, diffusion_model, groups)
            arguments = adapter.neutral_arguments(
                sampling.calculate_input(s, x).to(like.dtype), sampling.timestep(s).float(), spec.text_tokens, spec.guidance
            )
            out = diffusion_model(**arguments, transformer_options={"patches_replace": {"dit": probes}}).float()
            head_orders.append(probes.orders(0))
            group_orders.append(probes.orders(1))
            flops += _calibration_flops(adapter, adapter.call_shape(arguments))
            if i + 1 < len(sigmas):  # an Euler step to the next point
                denoised = sampling.calculate_denoised(s, out, x)
                x = denoised + (x - denoised) * (sigmas[i + 1] / sigma)
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return WidthRanking(
        percents=tuple(spec.percents),
        heads=tuple(head_orders),
        groups=tuple(group_orders),
        seconds=time.perf_counter() - started,
        flops=flops,
    )


def _sigma(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


def _calibration_flops(adapter: ModelAdapter, shape: CallShape) -> float:
    """A full forward, plus the probes: every block's output linears once more, one unit at a time."""
    total = adapter.full_flops(shape).total
    for block in adapter.blocks:
        part = adapter.block_flops(block, adapter.full_block_work(block, shape))
        total += part.proj + part.mlp / 2  # the MLP's output half (D x M, like its input half)
    return total


class _RankingCache:
    """Rankings per diffusion-model module (weakly held) and weight identity; small LRU per module."""

    def __init__(self, per_model: int = 8):
        self._lock = threading.Lock()
        self._models: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
        self._per_model = per_model

    def get(self, model: torch.nn.Module, key: Any) -> WidthRanking | None:
        with self._lock:
            entries = self._models.get(model)
            if entries is None or key not in entries:
                return None
            entries.move_to_end(key)
            return entries[key]

    def put(self, model: torch.nn.Module, key: Any, ranking: WidthRanking) -> None:
        with self._lock:
            entries = self._models.setdefault(model, OrderedDict())
            entries[key] = ranking
            while len(entries) > self._per_model:
                entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


RANKINGS = _RankingCache()


def ranking_for(
    run: "RunContext", diffusion_model: torch.nn.Module, like: torch.Tensor, spec: CalibrationSpec, groups: int
) -> tuple[WidthRanking, bool]:
    """The cached ranking of these weights, or a fresh calibration (then True)."""
    key = None
    if run.weights_key is not None:
        modules = tuple(id(run.adapter.block_module(diffusion_model, b)) for b in run.adapter.blocks)
        key = (run.weights_key, modules, spec, groups, like.dtype, str(like.device))
        cached = RANKINGS.get(diffusion_model, key)
        if cached is not None:
            return cached, False
    ranking = calibrate(run, diffusion_model, like, spec, groups)
    if key is not None:
        RANKINGS.put(diffusion_model, key, ranking)
    return ranking, True


# --- the runtime ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WidthDecision:
    """Kept heads and groups of every block (None: all) for one sigma."""

    heads: tuple[tuple[int, ...] | None, ...]
    groups: tuple[tuple[int, ...] | None, ...]
    text: str

    @property
    def full(self) -> bool:
        return all(h is None for h in self.heads) and all(g is None for g in self.groups)


@register
class DynamicWidth(DynamicMethod):
    settings_type = WidthSettings
    order = 30
    settings: WidthSettings

    def __init__(self, settings: WidthSettings, run: "RunContext") -> None:
        super().__init__(settings, run)
        adapter = run.adapter
        self.thin_heads, self.thin_mlp = PARTS[settings.parts]
        self.head_count = adapter.head_count
        self.group_count = settings.group_count(adapter)
        self.blocks = adapter.blocks
        self.block_index = {block: i for i, block in enumerate(self.blocks)}
        self._decisions: dict[float, WidthDecision] = {}
        self._active: WidthDecision | None = None
        self._ranking: WidthRanking | None = None
        self._ramp: tuple[float, float] | None = None
        self._router_on: tuple[torch.Tensor, ...] | None = None  # the router's rows in block order, on the device
        self._router_rows: torch.Tensor | None = None
        if settings.router is not None:
            rows = {label: row for row, label in enumerate(settings.router.labels)}
            self._router_rows = torch.tensor([rows[block.label] for block in self.blocks])

    # --- hooks --------------------------------------------------------------------------------
    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        decision = self._decisions.get(call.step.sigma)
        if decision is None:
            decision, note = self._decide(call, model_call)
            self._decisions[call.step.sigma] = decision
            call.record.methods[self.name] = decision.text + note
        else:
            call.record.methods[self.name] = decision.text
        self._active = decision
        try:
            return proceed(model_call)
        finally:
            self._active = None

    def block_internals(self, call: "CallState", block: BlockRef, args: BlockArgs, internals: BlockInternals) -> BlockInternals:
        decision = self._active
        if decision is None or decision.full:
            return internals
        i = self.block_index[block]
        heads, groups = decision.heads[i], decision.groups[i]
        if self.thin_heads:
            call.record.note_block(block.label, "heads", (self.head_count if heads is None else len(heads)) / self.head_count)
        if self.thin_mlp:
            call.record.note_block(block.label, "mlp", (self.group_count if groups is None else len(groups)) / self.group_count)
        changes: dict[str, Any] = {}
        if heads is not None:
            changes["heads"] = heads
        if groups is not None:
            changes.update(mlp_groups=groups, mlp_group_count=self.group_count)
        return internals.with_changes(**changes) if changes else internals

    def finish(self) -> None:
        self._decisions.clear()
        self._active = None
        self._router_on = None

    # --- decisions ----------------------------------------------------------------------------
    def _decide(self, call: "CallState", model_call: "ModelCall") -> tuple[WidthDecision, str]:
        settings, percent = self.settings, call.step.percent
        none = (None,) * len(self.blocks)
        if not settings.in_window(percent):
            return WidthDecision(none, none, "full width (outside the window)"), ""
        if settings.router is not None:
            return self._route(call, model_call), ""
        note = ""
        if self._ramp is None:
            self._ramp, note = self._solve_ramp(call)
        fraction = ramp(*self._ramp, settings, percent)
        head_k = kept_count(fraction, self.head_count) if self.thin_heads else self.head_count
        group_k = kept_count(fraction, self.group_count) if self.thin_mlp else self.group_count
        if head_k == self.head_count and group_k == self.group_count:
            return WidthDecision(none, none, "full width"), note
        if self._ranking is None:
            self._ranking, fresh = ranking_for(self.run, call.diffusion_model, model_call.arguments["x"], settings.calibration, self.group_count)
            if fresh:
                call.add_executed(FlopBreakdown(extra=self._ranking.flops))
                note += f"; calibrated {len(self._ranking.percents)} points in {self._ranking.seconds:.2f} s"
                logger.info(
                    "Dynamic width: calibrated the head/MLP-group ranking in %.2f s (%d points, cached for these weights)",
                    self._ranking.seconds, len(self._ranking.percents),
                )
        point = self._ranking.point(percent)
        heads = tuple(_top(order, head_k) for order in self._ranking.heads[point])
        groups = tuple(_top(order, group_k) for order in self._ranking.groups[point])
        return WidthDecision(heads, groups, self._describe(heads, groups)), note

    def _route(self, call: "CallState", model_call: "ModelCall") -> WidthDecision:
        router = self.settings.router
        timestep = model_call.arguments["timestep"].reshape(-1).max().reshape(1)
        features = self.run.adapter.timestep_features(call.diffusion_model, timestep, model_call.arguments["x"].dtype)
        features = features.reshape(-1).float()
        if self._router_on is None or self._router_on[0].device != features.device:
            rows = self._router_rows
            self._router_on = tuple(
                t[rows].to(features.device) for t in (router.head_weight, router.head_bias, router.group_weight, router.group_bias)
            )
        head_w, head_b, group_w, group_b = self._router_on
        call.add_executed(FlopBreakdown(extra=router.flops))
        head_logits = (head_w @ features + head_b).cpu()
        group_logits = (group_w @ features + group_b).cpu()
        heads = tuple(_positive(row) for row in head_logits) if self.thin_heads else (None,) * len(self.blocks)
        groups = tuple(_positive(row) for row in group_logits) if self.thin_mlp else (None,) * len(self.blocks)
        return WidthDecision(heads, groups, self._describe(heads, groups))

    def _describe(self, heads: tuple, groups: tuple) -> str:
        def mean(kept: tuple, units: int) -> float:
            return sum(units if k is None else len(k) for k in kept) / (units * len(kept))

        if all(k is None for k in heads + groups):
            return "full width"
        parts = []
        if self.thin_heads:
            parts.append(f"heads {mean(heads, self.head_count):.2f}")
        if self.thin_mlp:
            parts.append(f"mlp {mean(groups, self.group_count):.2f}")
        return ", ".join(parts)

    # --- target FLOPs ---------------------------------------------------------------------------
    def _solve_ramp(self, call: "CallState") -> tuple[tuple[float, float], str]:
        """The fixed ramp, or the ramp whose average FLOPs ratio over this run's steps meets the target.

        Candidate ramps lie on one path, ordered by FLOPs: first the noisy end drops from full width
        to the minimum (clean end at full width), then the clean end drops too.
        """
        settings = self.settings
        if settings.target_flops is None:
            return (settings.noisy_width, settings.clean_width), ""
        percents = self._step_percents(call)
        ratio_of = _FlopsRatio(self.run.adapter, call.shape, self.head_count, self.group_count, self.thin_heads, self.thin_mlp)

        def path(u: float) -> tuple[float, float]:
            return 1.0 - min(u, 1.0), 1.0 - max(u - 1.0, 0.0)

        def average(u: float) -> float:
            noisy, clean = path(u)
            return sum(ratio_of(ramp(noisy, clean, settings, p)) for p in percents) / len(percents)

        target = settings.target_flops
        lowest = average(2.0)
        if lowest > target:
            return path(2.0), f"; target FLOPs {target:.2f} is out of reach here, lowest {lowest:.2f}"
        lo, hi = 0.0, 2.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if average(mid) <= target:
                hi = mid
            else:
                lo = mid
        noisy, clean = path(hi)
        return (noisy, clean), f"; target FLOPs {target:.2f}: ramp {noisy:.2f}->{clean:.2f}, {average(hi):.2f} of full"

    def _step_percents(self, call: "CallState") -> list[float]:
        sigmas = self.run.steps.sigmas[:-1]
        to_sigma = self.run.percent_to_sigma
        if not sigmas or to_sigma is None:
            return [call.step.percent]
        return [invert_decreasing(to_sigma, s) for s in sigmas]


class _FlopsRatio:
    """FLOPs of a call of `shape` at a width fraction, over the full model's (analytic, memoised)."""

    def __init__(self, adapter: ModelAdapter, shape: CallShape, heads: int, groups: int, thin_heads: bool, thin_mlp: bool):
        self.adapter, self.shape = adapter, shape
        self.heads, self.groups, self.thin_heads, self.thin_mlp = heads, groups, thin_heads, thin_mlp
        self.full = adapter.full_flops(shape).total
        self._memo: dict[tuple[int, int], float] = {}

    def __call__(self, fraction: float) -> float:
        head_k = kept_count(fraction, self.heads) if self.thin_heads else self.heads
        group_k = kept_count(fraction, self.groups) if self.thin_mlp else self.groups
        key = (head_k, group_k)
        if key not in self._memo:
            internals = BlockInternals(
                heads=tuple(range(head_k)), mlp_groups=tuple(range(group_k)), mlp_group_count=self.groups
            )
            total = self.adapter.stem_flops(self.shape).total
            for block in self.adapter.blocks:
                work = self.adapter.reduced_work(block, self.adapter.full_block_work(block, self.shape), internals)
                total += self.adapter.block_flops(block, work).total
            self._memo[key] = total / self.full
        return self._memo[key]


def _top(order: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    return None if k >= len(order) else tuple(sorted(order[:k]))


def _positive(logits: torch.Tensor) -> tuple[int, ...] | None:
    """Units with a positive logit (None: all); the largest logit when none is positive."""
    kept = torch.nonzero(logits > 0).reshape(-1).tolist()
    if len(kept) == logits.numel():
        return None
    return tuple(kept) if kept else (int(torch.argmax(logits)),)


__all__ = [
    "PARTS",
    "PRESETS",
    "RANKINGS",
    "CalibrationSpec",
    "DynamicWidth",
    "RouterHeader",
    "WidthDecision",
    "WidthRanking",
    "WidthRouter",
    "WidthSettings",
    "calibrate",
    "load_width_router",
    "save_width_router",
]
