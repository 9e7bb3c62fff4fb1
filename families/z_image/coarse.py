"""Coarse patch grids for Z-Image as ComfyUI runs it (see `coarse.py` for the seam): training-free only.

Facts about ComfyUI's NextDiT this relies on (comfy/ldm/lumina/model.py, 0.3.75 and 0.12.1):
- The image token at grid row i gets the position `shift_y + i * scale_y` (and the same along x) from
  `transformer_options["rope_options"]`, as on Flux: a coarse token gets the centre of its region
  (`centred_rope_options`); the caption keeps its positions.
- The model's `timesteps` is sigma itself (model sampling multiplier 1, CONST: the input is the sampler's x); the
  model embeds 1 - sigma and returns the negated velocity, which the host's CONST sampling reads as its output.
- No post-input patch point: no trained coarse embedding. Calls with reference latents (Z-Image Omni on 0.12.1)
  stay native.
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
