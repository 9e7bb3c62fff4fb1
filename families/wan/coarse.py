"""Coarse patch grids for Wan as ComfyUI runs it (see `coarse.py` for the seam): training-free only.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..base import BlockRef
from ..capabilities import ModelInfo
from ..coarse import TrainingFreeCoarseGrid

if TYPE_CHECKING:
    from .adapter import WanArchitecture

_NO_TRAINED = "Wan has no post-input patch point: coarse steps on Wan run training-free, without a trained embedding"


class WanCoarseGrid(TrainingFreeCoarseGrid):
    no_trained_reason = _NO_TRAINED
    family_label = "Wan"
    timestep_scale = 1000.0  # Wan's model sampling passes timestep = 1000 * sigma

    def __init__(self, arch: "WanArchitecture", blocks: tuple[BlockRef, ...], info: ModelInfo) -> None:
        super().__init__(arch, blocks, info, native_patch=arch.patch_size[1], noisy_channels=arch.out_channels)

    def file_fields(self) -> dict[str, str]:
        return self._info.header("patch_size", "in_channels", "out_channels")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        extra = arguments.get("kwargs") or {}
        if arguments.get("time_dim_concat") is not None:
            return "latents concatenated along time are embedded at their native size"
        if extra.get("reference_latent") is not None or extra.get("context_latents") is not None:
            return "reference latents are embedded at their native size"
        if extra.get("control") is not None or arguments.get("control") is not None:
            return "control residuals are laid out per native token"
        timestep = arguments.get("timestep")
        if isinstance(timestep, torch.Tensor) and timestep.ndim > 1:
            return "the timestep varies over the frames"
        return None
