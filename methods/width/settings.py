"""The Dynamic Width Patcher's settings: the parts it thins, the ramp presets, and the width a setting keeps at a step."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ...families import ModelAdapter, UnsupportedModelError
from ...core.plan import MethodSettings
from .calibration import CalibrationSpec
from .file import WidthRouter


# which parts a setting thins: (attention heads, MLP channel groups)
PARTS: dict[str, tuple[bool, bool]] = {"both": (True, True), "heads": (True, False), "mlp": (False, True)}
PART_LABELS: dict[str, str] = {"heads and MLP": "both", "attention heads": "heads", "MLP": "mlp"}  # as nodes list them


def default_group_count(heads: int, mlp_hidden: int) -> int:
    """MLP channel groups per block by default: one per attention head (DyDiT's pairing) where that divides the MLP's
    hidden units, else the divisor of them nearest to the head count, the larger on a tie (Z-Image: 30 heads,
    10240 units -> 32 groups of 320)."""
    if mlp_hidden % heads == 0:
        return heads
    divisors = [d for d in range(1, mlp_hidden + 1) if mlp_hidden % d == 0 and d <= 4 * heads]
    return min(divisors, key=lambda d: (abs(d - heads), -d))


@dataclass(frozen=True)
class WidthPreset:
    noisy_width: float  # fraction of heads / groups kept at the start of the window (the noisiest step)
    clean_width: float  # ... at its end


# Linear ramps over the sampling progress; the start/end percent window of the node applies on top.
# Chosen from the benchmark on the reference model (16 steps, PSNR against full compute, training-free
# ranking): quality 0.9->1.0 keeps 26 dB; the others trade quality for speed (20, 15, 13 dB there).
PRESETS: dict[str, WidthPreset] = {
    "quality": WidthPreset(0.9, 1.0),
    "balanced": WidthPreset(0.75, 1.0),
    "fast": WidthPreset(0.5, 1.0),
    "fastest": WidthPreset(0.3, 0.9),
}


# How the node lists them: the presets that trade image quality for speed say so.
PRESET_LABELS: dict[str, str] = {
    "quality": "quality",
    "balanced": "balanced (trades quality)",
    "fast": "fast (trades more quality)",
    "fastest": "fastest (trades most quality)",
}


# --- settings ------------------------------------------------------------------------------------
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
    mlp_groups: int = 0  # MLP channel groups per block; 0 = `default_group_count` (one per attention head where it divides)
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
            raise ValueError(f"Dynamic width: mlp_groups must be >= 0 (0 = one per head, or the nearest count that divides the MLP), got {self.mlp_groups}.")
        units = adapter.width_units()
        if units is None:
            raise UnsupportedModelError(f"Dynamic width does not support {adapter.display_name} models: their heads and MLP widths are not described.")
        heads, mlp_hidden = units.head_count, units.mlp_hidden
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
        info = adapter.model_info()
        return self.mlp_groups or default_group_count(info.num_heads, info.mlp_hidden)

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
