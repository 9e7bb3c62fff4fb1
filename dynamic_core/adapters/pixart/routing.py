"""Token routing for PixArt: a block's `img` holds the image tokens alone (the text is the cross-attention context, which
every kept token still attends to in full), absolute position embeddings already added and the modulation per sample,
so a subset of them runs a block by a gather and a scatter."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...slicing import gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting


class PixArtTokenRouting(TokenRouting):
    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        return stream["img"]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        return {**args, "img": gather_tokens(args["img"], index)}

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        img = args["img"].clone()  # the host's blocks return new tensors: the block's input stays as it was
        img.scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), reduced_out["img"])
        return {**reduced_out, "img": img}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {"mlp.fc2": MlpTokenGate()}
