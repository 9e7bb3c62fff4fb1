"""Token routing for Qwen-Image: the image stream `img` holds the generated image's tokens, then an edit's reference
tokens; RoPE `pe` (B, 1, T+N, hd/2, 2, 2) covers [text, image] with the text first. Only the generated image's tokens
are routed: the reference tokens run every block in full, so an edit keeps reading its source image as it is."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ...core.slicing import gather_sequence, gather_tokens
from ..base import BlockRef
from ..capabilities import CallLayout, MlpTokenGate, TokenRouting


class QwenTokenRouting(TokenRouting):
    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        img = stream["img"]
        return img[:, : img.shape[1] - layout.reference_tokens]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        img, text = args["img"], args["txt"].shape[1]
        generated = img.shape[1] - layout.reference_tokens
        batch, device = index.shape[0], index.device
        joint = torch.cat((torch.arange(text, device=device).expand(batch, -1), index + text,
                           torch.arange(text + generated, text + img.shape[1], device=device).expand(batch, -1)), dim=1)
        reduced = dict(args)
        reduced["img"] = torch.cat((gather_tokens(img[:, :generated], index), img[:, generated:]), dim=1)
        if args.get("pe") is not None:
            reduced["pe"] = gather_sequence(args["pe"], joint, dim=2)
        return reduced

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        img, out = args["img"], reduced_out["img"]
        generated, kept = img.shape[1] - layout.reference_tokens, index.shape[1]
        img[:, :generated].scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), out[:, :kept])
        img[:, generated:] = out[:, kept:]
        return {**reduced_out, "img": img}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {"img_mlp.net.2": MlpTokenGate()}  # the image MLP's last linear: its whole output is the update
