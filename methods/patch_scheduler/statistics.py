"""DDiT's Δ³ rule for the Dynamic Patch Scheduler's auto mode, as tensor functions without host syncs.

The reasoning and the equations: docs/methods/patch_scheduler.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchDecision:
    factor: int  # 1 = native
    reason: str  # what telemetry shows for the step
    statistics: Mapping[int, float] = field(default_factory=dict)  # factor -> relative Δ³ compared with tau


def third_difference(latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """Δ³z of four consecutive step latents, oldest first (exactly zero for a quadratic trajectory)."""
    z0, z1, z2, z3 = (z.double() for z in latents)
    return z3 - 3 * z2 + 3 * z1 - z0


def percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(values, q, dim=-1) with linear interpolation, without reading anything back to the
    host (torch.quantile checks its q on the device): the positions come from the shape alone."""
    count = values.shape[-1]
    position = q * (count - 1)
    low = math.floor(position)
    high = min(low + 1, count - 1)
    ordered = values.sort(dim=-1).values
    return ordered[..., low] + (position - low) * (ordered[..., high] - ordered[..., low])


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
    return percentile(variance.sqrt(), epsilon)


def roughness(latents: Sequence[torch.Tensor], factors: Sequence[int], native_patch: int, epsilon: float) -> torch.Tensor:
    """(len(factors), B): the Δ³ patch statistic of four step latents for each coarse factor, per sample."""
    delta = third_difference(latents)
    return torch.stack([patch_statistic(delta, factor * native_patch, epsilon) for factor in factors])


def relative_roughness(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(F,): per factor, the largest over the batch of each sample's statistic over its reference value.

    A reference of exactly zero (a perfectly quadratic start) makes any later roughness infinitely
    larger, and none (0 / 0) no larger.
    """
    ratio = values / reference
    ratio = torch.where(reference > 0, ratio, torch.where(values > 0, math.inf, 0.0))
    return ratio.amax(dim=-1)


def choose_patch_factor(relative: Mapping[int, float], tau: float, epsilon: float, reference_step: int) -> PatchDecision:
    """DDiT's rule on relative values (factor -> Δ³ statistic over its value at `reference_step`):
    the largest factor whose value is below tau, else native."""
    label = f"Δ³ p{epsilon * 100:g}"
    passing = [factor for factor, value in relative.items() if value < tau]
    if passing:
        factor = max(passing)
        return PatchDecision(
            factor, f"patch {factor}x ({label} = {relative[factor]:.2f} × step {reference_step}'s < τ {tau:g})", relative
        )
    values = ", ".join(f"{factor}x {value:.2f}" for factor, value in sorted(relative.items()))
    return PatchDecision(1, f"native ({label}: {values} × step {reference_step}'s ≥ τ {tau:g})", relative)


__all__ = [
    "PatchDecision",
    "choose_patch_factor",
    "patch_statistic",
    "percentile",
    "relative_roughness",
    "roughness",
    "third_difference",
]
