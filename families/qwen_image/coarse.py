"""Coarse patch grids for Qwen-Image as ComfyUI runs it (see `../coarse.py` for the seam): training-free only.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..coarse import CoarseCall, PositionedCoarseGrid, PositionRewrite


class QwenImageCoarseGrid(PositionedCoarseGrid):
    family_label = "Qwen-Image"
    no_trained_reason = ("Qwen-Image has no post-input patch point: coarse steps on Qwen-Image run training-free, "
                         "without a trained embedding")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        if arguments.get("control") is not None or (arguments.get("kwargs") or {}).get("control") is not None:
            return "ControlNet residuals are laid out per native token"
        return None

    def text_tokens(self, arguments: Mapping[str, Any]) -> int:
        return arguments["context"].shape[1]

    def position_points(self) -> Mapping[str, PositionRewrite]:
        return {"pe_embedder.forward": self.centred_positions}

    def _tokens(self, size: int) -> int:
        return (size + self.native_patch // 2) // self.native_patch

    def centred_positions(self, own: Callable[[torch.Tensor], Any], call: CoarseCall, ids: torch.Tensor) -> Any:
        """The host's embedding of [text, image, references] ids as a native call would place them."""
        f, text = call.factor, call.text_tokens
        native = [self._tokens(s) for s in call.native_size]
        coarse = [self._tokens(s) for s in call.coarse_size]
        moved = ids.to(torch.float32, copy=True)
        moved[:, :text] += max(n // 2 for n in native) - max(c // 2 for c in coarse)
        image = moved[:, text : text + coarse[0] * coarse[1]]
        for axis, (n, c) in enumerate(zip(native, coarse), start=1):
            image[..., axis] = f * (image[..., axis] + c // 2) + (f - 1) / 2 - n // 2
        return own(moved)
