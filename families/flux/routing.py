"""Token routing for Flux.1: which part of a block's streams are image tokens, and how a subset of them
runs a block with its RoPE positions and attention-mask rows.

Double blocks hold the image tokens alone in `img` (text in `txt`); single blocks hold the joint
sequence [text, image] in `img`. RoPE `pe` (B, 1, T+N, hd/2, 2, 2) and `attn_mask` cover the joint
sequence, text first, so both are gathered at the joint positions of the kept tokens.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import gather_sequence, gather_square_mask, gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting

if TYPE_CHECKING:
    from .adapter import FluxArchitecture

DOUBLE = "double"


class FluxTokenRouting(TokenRouting):
    def __init__(self, arch: "FluxArchitecture"):
        self.arch = arch

    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        img = stream["img"]
        return img if block.kind == DOUBLE else img[:, layout.text_tokens:]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        text_tokens = layout.text_tokens
        text = torch.arange(text_tokens, device=index.device).expand(index.shape[0], -1)
        joint = torch.cat((text, index + text_tokens), dim=1)  # positions in the [text, image] sequence
        reduced = dict(args)
        # The double block's txt stream is passed as is: the block updates it in place, as the host's would.
        reduced["img"] = gather_tokens(args["img"], index if block.kind == DOUBLE else joint)
        if args.get("pe") is not None:
            reduced["pe"] = gather_sequence(args["pe"], joint, dim=2)
        if args.get("attn_mask") is not None:
            reduced["attn_mask"] = gather_square_mask(args["attn_mask"], joint)
        return reduced

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        text_tokens = layout.text_tokens
        img, out = args["img"], reduced_out["img"]
        if block.kind == DOUBLE:
            img.scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), out)
        else:
            img[:, :text_tokens] = out[:, :text_tokens]
            img[:, text_tokens:].scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), out[:, text_tokens:])
        return {**reduced_out, "img": img}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        if block.kind == DOUBLE:  # the image stream's own MLP: its whole output is the update
            return {"img_mlp.2": MlpTokenGate()}
        # linear2 reads [attention | gelu(mlp)] of the joint [text, image] sequence and carries the bias
        return {"linear2": MlpTokenGate(first_row=layout.text_tokens, columns=(self.arch.hidden_size, self.arch.mlp_hidden))}
