"""Token routing for LTX-Video: every token of a block's `img` is a video token (frames x rows x columns; the text is
the cross-attention context, which every kept token still attends to in full, with its mask).

A kept token runs with its own RoPE rows and, when the call has one timestep per token (image-to-video conditioning
frames), its own modulation. The hosts hold RoPE differently: 0.3.75 one table (B, 1, N, D/2, 2, 2); 0.12.1 a tuple
(cos, sin[, split]) of (B, N, D) interleaved or (B, H, N, D/H/2) split tables; each is gathered along its token axis.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...core.slicing import gather_sequence, gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting

_TOKEN_AXIS = {3: 1, 4: 2, 6: 2}  # RoPE table rank -> its token axis: interleaved (B, N, D), split (B, H, N, d), 0.3.75


def gather_positions(pe: Any, index: torch.Tensor) -> Any:
    """The RoPE tables `pe` (a tensor, or the tuple the 0.12 host passes) at the tokens `index` (B, k)."""
    if isinstance(pe, torch.Tensor):
        return gather_sequence(pe, index, dim=_TOKEN_AXIS[pe.ndim])
    return type(pe)(gather_positions(part, index) if isinstance(part, torch.Tensor) else part for part in pe)


class LTXVTokenRouting(TokenRouting):
    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        return stream["img"]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        x, vec = args["img"], args["vec"]
        reduced = {**args, "img": gather_tokens(x, index), "pe": gather_positions(args["pe"], index)}
        if vec.shape[1] > 1:  # a timestep per token: each kept token keeps its own modulation
            reduced["vec"] = gather_sequence(vec, index, dim=1)
        return reduced

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        x = args["img"]  # the host's block updates its input in place: so does the merge
        x.scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), reduced_out["img"])
        return {**reduced_out, "img": x}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {"ff.net.2": MlpTokenGate()}  # every token of `img` is a video token; the FFN's output is its update
