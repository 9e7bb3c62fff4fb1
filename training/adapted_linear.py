"""A host block linear as the student calls it (training only): width masks, the TD-LoRA bypass and SDT's
per-token weights of the MLP update, each applied as the sliced layer computes it at inference."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..families import MlpTokenGate
from ..methods.token_router.trainable import weighted_mlp

TokenWeights = Callable[[], "tuple[torch.Tensor, MlpTokenGate] | None"]


def per_row(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B, C) per-sample mask broadcast over x's token axes."""
    return mask.reshape(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[-1]).to(x.dtype)


class AdaptedLinear:
    """The host layer with its input columns masked (the width decision of the units feeding it), the TD-LoRA
    bypass on the masked input, and, while an SDT call runs (`token_weights` returns them), each image token's
    MLP update weighted by its decision."""

    def __init__(self, layer: torch.nn.Module, lora: tuple[torch.Tensor, torch.Tensor] | None,
                 columns: torch.Tensor | None, mask: torch.Tensor | None, token_weights: TokenWeights | None = None):
        self.layer, self.lora, self.columns, self.mask, self.token_weights = layer, lora, columns, mask, token_weights

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weighted = self.token_weights() if self.token_weights is not None else None
        if weighted is not None:
            return weighted_mlp(x, weighted[0], weighted[1], self._linear)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            x = x * per_row(self.mask, x)
        out = self.layer(x)
        if self.lora is not None:
            down, up = self.lora  # (K*r, in), (out, K*r)
            hidden = F.linear(x, down.to(x.dtype))
            if self.columns is not None:
                hidden = hidden * per_row(self.columns, hidden)
            out = out + F.linear(hidden, up.to(x.dtype))
        return out


__all__ = ["AdaptedLinear", "per_row"]
