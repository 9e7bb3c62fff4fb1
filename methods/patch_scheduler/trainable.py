"""DDiT's trainable parts: the coarse-patch embedding and de-embedding with the patch-size identifier (a
block LoRA active on coarse calls only lives with the student's other low-rank layers).

The layers start from the model's own patch embedding and final linear resized to the coarse patch
(`derived_layers`: "area" by default, or DDiT's / FlexiViT's pseudo-inverse-bilinear resize), the
de-embedding (a correction on top of the host's own final linear, see `coarse_output`) and the identifier
at zero: with "area" the untrained student is exactly the scheduler's training-free path. A coarse call
in training computes what the Patch Scheduler's trained path computes at inference (`coarse_tokens`,
`coarse_output` are the same functions), so the exported file reproduces the training forward.

Which steps run coarse is fixed by a manual schedule (`0-70%:2`): step s of N is coarse when the range
covering 100 * s / N has factor f > 1 (`range_of_step`, as the scheduler's manual mode decides). One factor per run.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ...families.coarse import CoarseGrid
from .file import CoarseLayers, derived_layers
from .schedule import ScheduleRange, parse_schedule, range_of_step

INITIALISATIONS = ("area", "pinv_bilinear")


def schedule_factor(text: str) -> tuple[tuple[ScheduleRange, ...], int]:
    """The parsed manual schedule and its one coarse factor; ValueError for none or several."""
    schedule = parse_schedule(text)
    factors = sorted({r.factor for r in schedule if r.factor > 1})
    if len(factors) != 1:
        raise ValueError(
            f"Trainer: the coarse schedule '{text}' must name exactly one coarse factor (e.g. '0-70%:2'), "
            f"it names {', '.join(f'{f}x' for f in factors) or 'none'}."
        )
    return schedule, factors[0]


def coarse_step_indices(schedule: Sequence[ScheduleRange], steps: int) -> list[int]:
    """Steps s of a run of `steps` that the schedule runs coarse (the Patch Scheduler's manual rule)."""
    return [step for step in range(steps) if (found := range_of_step(schedule, step, steps)) is not None and found.factor > 1]


class CoarseParts(torch.nn.Module):
    """The embedding, de-embedding and patch-size identifier of one coarse factor (float32 parameters)."""

    def __init__(self, grid: CoarseGrid, diffusion_model: torch.nn.Module, factor: int, init: str = "area") -> None:
        super().__init__()
        if init not in INITIALISATIONS:
            raise ValueError(f"Trainer: coarse initialisation must be one of {', '.join(INITIALISATIONS)}, got '{init}'.")
        embed, final = grid.native_linears(diffusion_model)

        def weights(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = getattr(layer, "bias", None)
            return layer.weight.detach().float().cpu(), bias.detach().float().cpu() if bias is not None else None

        layers = derived_layers(*weights(embed), *weights(final), grid.native_patch, factor, init)
        self.factor = factor
        self.embed_weight = torch.nn.Parameter(layers.embed_weight.clone())
        self.embed_bias = torch.nn.Parameter(layers.embed_bias.clone())
        self.patch_id = torch.nn.Parameter(layers.patch_id.clone())
        self.deembed_weight = torch.nn.Parameter(torch.zeros_like(layers.deembed_weight))
        self.deembed_bias = torch.nn.Parameter(torch.zeros_like(layers.deembed_bias))

    def layers(self, like: torch.Tensor | None = None) -> CoarseLayers:
        """The parameters as the Patch Scheduler's layers (differentiable; cast to `like`'s dtype when given)."""
        tensors = (self.embed_weight, self.embed_bias, self.patch_id, self.deembed_weight, self.deembed_bias)
        if like is not None:
            tensors = tuple(t.to(like.dtype) for t in tensors)
        return CoarseLayers(*tensors)


__all__ = ["CoarseParts", "INITIALISATIONS", "coarse_step_indices", "schedule_factor"]
