"""Coarse patch grids for SD3 / SD3.5 as ComfyUI runs them (see `../coarse.py` for the seam): training-free only.

Facts about ComfyUI's MMDiT this relies on (comfy/ldm/modules/diffusionmodules/mmdit.py, 0.3.75 and 0.12.1):
- The forward adds `cropped_pos_embed(x.shape[-2:])` to the embedded image tokens: absolute 2-D embeddings cropped from
  the centre of a `pos_embed_max_size`² table (or sin-cos ones computed for the size). As DDiT prescribes for absolute
  embeddings, a coarse token takes the native embeddings interpolated at the centre of the region it covers: the
  stand-in for `cropped_pos_embed` crops the native (padded) grid and samples it bilinearly at f*i + (f-1)/2.
- `timesteps` is 1000 * sigma (ModelSamplingDiscreteFlow, CONST); ControlNet residuals are per native token.
- No post-input patch point: no trained coarse embedding.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..coarse import CoarseCall, PositionedCoarseGrid, PositionRewrite


class SD3CoarseGrid(PositionedCoarseGrid):
    family_label = "SD3"
    time_argument = "timesteps"
    timestep_scale = 1000.0
    no_trained_reason = ("SD3 has no post-input patch point: coarse steps on SD3 run training-free, without a "
                         "trained embedding")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        if arguments.get("control") is not None:
            return "ControlNet residuals are laid out per native token"
        return None

    def factor_refusal(self, arguments: Mapping[str, Any], factor: int) -> str | None:
        table = self.arch.position_table
        if not table:
            return None
        size = factor * self.native_patch
        tokens = max(-(-int(s) // size) * factor for s in arguments["x"].shape[-2:])
        if tokens > table:
            return f"the padded grid ({tokens} tokens a side) is larger than the position table ({table})"
        return None

    def position_points(self) -> Mapping[str, PositionRewrite]:
        return {"cropped_pos_embed": self.interpolated_positions}

    def interpolated_positions(self, own: Callable[..., torch.Tensor], call: CoarseCall, hw: Any,
                               device: Any = None) -> torch.Tensor:
        """The native embeddings of the area the coarse latent covers, sampled at the centres of its tokens."""
        f, patch = call.factor, self.native_patch
        rows, cols = (int(s) // patch for s in hw)  # a coarse latent is a whole number of patches
        native = own((int(hw[0]) * f, int(hw[1]) * f), device=device)
        batch, _, width = native.shape
        grid = native.reshape(batch, rows * f, cols * f, width).permute(0, 3, 1, 2).float()
        centres = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)  # at f*i + (f-1)/2
        return centres.permute(0, 2, 3, 1).reshape(batch, rows * cols, width).to(native.dtype)
