"""Token routing for Z-Image: one joint sequence [caption (padded), image, image padding] runs the blocks; RoPE
`freqs_cis` (B, S, 1, hd/2, 2, 2) covers it in the same order. Only the image tokens are routed: the caption and the
padding tokens (`CallLayout.reference_tokens`, at the end) run every block in full."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...core.slicing import RunIndexCache, gather_sequence, gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting


def joint_rows(layout: CallLayout, index: torch.Tensor, cache: RunIndexCache | None = None) -> torch.Tensor:
    """(B, T + k + P) positions in the joint sequence of the caption, the image tokens `index` (B, k) and the padding."""
    text, image, padding = layout.text_tokens, layout.routable_tokens, layout.reference_tokens
    batch, device = index.shape[0], index.device

    def fixed() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.arange(text, device=device).expand(batch, -1),
                torch.arange(text + image, text + image + padding, device=device).expand(batch, -1))

    head, tail = cache.get(("z_image.fixed", text, image, padding, batch, device), fixed) if cache is not None else fixed()
    return torch.cat((head, index + text, tail), dim=1)


class ZImageTokenRouting(TokenRouting):
    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        img = stream["img"]  # a reduced block's output holds only the kept image tokens between caption and padding
        return img[:, layout.text_tokens: img.shape[1] - layout.reference_tokens]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        rows = joint_rows(layout, index)
        reduced = dict(args)
        reduced["img"] = gather_tokens(args["img"], rows)
        if args.get("pe") is not None:
            reduced["pe"] = gather_sequence(args["pe"], rows, dim=1)
        if args.get("mask") is not None:
            raise ValueError("Z-Image: the Token Router does not route a block call with an attention mask (none in text-to-image)")
        return reduced

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        img, out = args["img"], reduced_out["img"]
        rows = joint_rows(layout, index)
        img.scatter_(1, rows[..., None].expand(-1, -1, img.shape[-1]), out)
        return {**reduced_out, "img": img}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {"feed_forward.w2": MlpTokenGate(first_row=layout.text_tokens)}
