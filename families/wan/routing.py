"""Token routing for Wan: every token of a block's `img` is a video token (frames x rows x cols, the
text is in the cross-attention context, which every kept token still attends to in full).

A subset of tokens runs a block with its own rows of the 3-D RoPE table (`pe`, one row per token), so
each kept token keeps its frame, row and column position. Per-frame modulation (Wan 2.2 TI2V 5B:
`vec` (B, F, 6, D), which the host spreads over each frame's tokens) is spread over the tokens first and
gathered with them, so a kept token keeps its own frame's modulation.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...core.slicing import gather_sequence, gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting


def per_token_modulation(vec: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, F, 6, D) per-frame modulation spread over `tokens` frame-major tokens, as the host's `repeat_e`
    spreads it (each frame's value over tokens // F tokens; an uneven split rounds up and is cut)."""
    frames = vec.shape[1]
    repeats = tokens // frames
    if repeats * frames == tokens:
        return vec.repeat_interleave(repeats, dim=1)
    return vec.repeat_interleave(repeats + 1, dim=1)[:, :tokens]


class WanTokenRouting(TokenRouting):
    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        return stream["img"]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        x = args["img"]
        reduced = dict(args)
        reduced["img"] = gather_tokens(x, index)
        reduced["pe"] = gather_sequence(args["pe"], index, dim=1)
        vec = args["vec"]
        if vec.ndim == 4 and vec.shape[1] > 1:  # per-frame modulation: each kept token takes its frame's
            reduced["vec"] = gather_sequence(per_token_modulation(vec, x.shape[1]), index, dim=1)
        return reduced

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        x = args["img"]
        x.scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), reduced_out["img"])
        return {**reduced_out, "img": x}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {"ffn.2": MlpTokenGate()}  # every token of `img` is an image token; the FFN's output is its update
