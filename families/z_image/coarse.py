"""Coarse patch grids for Z-Image as ComfyUI runs it (see `coarse.py` for the seam): training-free only.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ..coarse import TrainingFreeCoarseGrid


class ZImageCoarseGrid(TrainingFreeCoarseGrid):
    family_label = "Z-Image"
    time_argument = "timesteps"
    no_trained_reason = ("Z-Image has no post-input patch point: coarse steps on Z-Image run training-free, without a "
                         "trained embedding")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        extra = arguments.get("kwargs") or {}
        if extra.get("ref_latents") or extra.get("siglip_feats"):
            return "reference latents are embedded at their native size"
        return None
