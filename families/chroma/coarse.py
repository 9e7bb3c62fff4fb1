"""Coarse patch grids for Chroma as ComfyUI runs it (see `../coarse.py` for the seam): training-free only.

Facts about ComfyUI's Chroma this relies on (comfy/ldm/chroma/model.py, 0.3.75 and 0.12.1):
- `_forward` gives the image token at grid row i, column j the position (0, i, j) itself, ignoring `rope_options`;
  `forward_orig` embeds `cat(txt_ids, img_ids)` through `pe_embedder`. During a coarse call the stand-in for
  `pe_embedder.forward` moves image token (i, j) to (f*i + (f-1)/2, f*j + (f-1)/2), the centre of the native tokens
  it covers; the text keeps its positions.
- `timestep` is sigma (multiplier 1, CONST), as on Flux; ControlNet residuals and masks are per native token.
- No post-input patch point: no trained coarse embedding.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..coarse import CoarseCall, PositionedCoarseGrid, PositionRewrite
from ..flux.coarse import FluxCoarseGrid


def centred_image_positions(own: Callable[[torch.Tensor], Any], call: CoarseCall, ids: torch.Tensor) -> Any:
    """The host's position embedding of [text, image] ids with each coarse image token at its region's centre."""
    f, text = call.factor, call.text_tokens
    moved = ids.to(torch.float32, copy=True)
    moved[:, text:, 1:] = moved[:, text:, 1:] * f + (f - 1) / 2
    return own(moved)


class ChromaCoarseGrid(PositionedCoarseGrid, FluxCoarseGrid):
    family_label = "Chroma"
    no_trained_reason = ("Chroma has no post-input patch point: coarse steps on Chroma run training-free, without a "
                         "trained embedding")

    def position_points(self) -> Mapping[str, PositionRewrite]:
        return {"pe_embedder.forward": centred_image_positions}

    def text_tokens(self, arguments: Mapping[str, Any]) -> int:
        return arguments["context"].shape[1]
