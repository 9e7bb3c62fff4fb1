"""Coarse patch grids for LTX-Video as ComfyUI runs it (see `../coarse.py` for the seam): training-free only.

Facts about ComfyUI's LTXVModel this relies on (comfy/ldm/lightricks, 0.3.75 and 0.12.1):
- Token positions come from `patchifier.patchify`, which returns the latent's tokens and their latent coordinates
  (B, 3, N) [frame, row, column] (0.12.1: (B, 3, N, 2), each token's start and end); the forward turns them into pixel
  coordinates and RoPE. As DDiT prescribes, a coarse token takes the position of the centre of the region it covers:
  the stand-in for `patchify` rewrites rows and columns to f*i + (f-1)/2 (0.12.1: start f*i + (f-1)/2, end one later,
  so a model that reads the middle of each token gets f*i + f/2, the region's centre). Frames stay native.
- The model sampling passes timestep = sigma (flow matching, CONST); a timestep per token (image-to-video conditioning
  frames) and keyframe guides are laid out per native token: such calls stay native.
- No post-input patch point: no trained coarse embedding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..base import BlockRef
from ..capabilities import ModelInfo
from ..coarse import CoarseCall, PositionedCoarseGrid, PositionRewrite

if TYPE_CHECKING:
    from .adapter import LTXVArchitecture


class LTXVCoarseGrid(PositionedCoarseGrid):
    family_label = "LTX-Video"
    timestep_scale = 1.0
    no_trained_reason = ("LTX-Video has no post-input patch point: coarse steps on LTX-Video run training-free, without a "
                         "trained embedding")

    def __init__(self, arch: "LTXVArchitecture", blocks: tuple[BlockRef, ...], info: ModelInfo) -> None:
        super().__init__(arch, blocks, info, native_patch=1, noisy_channels=arch.in_channels)

    def file_fields(self) -> dict[str, str]:
        return self._info.header("in_channels")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        extra = arguments.get("kwargs") or {}
        if arguments.get("keyframe_idxs") is not None or extra.get("keyframe_idxs") is not None:
            return "keyframe guides are placed per native token"
        if arguments.get("denoise_mask") is not None or extra.get("denoise_mask") is not None:
            return "the denoise mask is laid out per native token"
        timestep, latent = arguments.get("timestep"), arguments.get("x")
        if isinstance(timestep, torch.Tensor) and isinstance(latent, torch.Tensor) and timestep.numel() > latent.shape[0]:
            return "the timestep varies over the tokens (image-to-video conditioning frames)"
        return None

    def position_points(self) -> Mapping[str, PositionRewrite]:
        return {"patchifier.patchify": self.centred_coordinates}

    def centred_coordinates(self, own: Callable[..., tuple[torch.Tensor, torch.Tensor]], call: CoarseCall,
                            latents: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's tokens of the coarse latent, with rows and columns at the centres of the native regions."""
        tokens, coordinates = own(latents, *args, **kwargs)
        f = call.factor
        centred = coordinates.clone().float()
        start = centred[:, 1:3, :, 0] if centred.ndim == 4 else centred[:, 1:3]
        start.mul_(f).add_((f - 1) / 2)
        if centred.ndim == 4:  # (start, end) per token: the end one after the start, as a native token's
            centred[:, 1:3, :, 1] = centred[:, 1:3, :, 0] + 1
        return tokens, centred.to(coordinates.dtype) if coordinates.is_floating_point() else centred
