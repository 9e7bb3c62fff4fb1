"""A host block linear as the student calls it (training only): the parts' `LinearPieces` applied as the sliced
layer computes them at inference (width masks on its input columns, low-rank bypasses, SDT's per-token weights of
the MLP update)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.method import LinearPieces


def per_row(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B, C) per-sample mask broadcast over x's token axes."""
    return mask.reshape(mask.shape[0], *([1] * (x.ndim - 2)), mask.shape[-1]).to(x.dtype)


class AdaptedLinear:
    """The host layer with its input columns masked, the bypasses on the masked input (each with its per-sample
    column gates), and, while an SDT call runs (`token_weights` returns them), each image token's MLP update
    weighted by its decision."""

    def __init__(self, layer: torch.nn.Module, pieces: LinearPieces):
        self.layer, self.pieces = layer, pieces

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weighted = self.pieces.token_weights() if self.pieces.token_weights is not None else None
        if weighted is not None:
            weigh, weights, gate = weighted
            return weigh(x, weights, gate, self._linear)
        return self._linear(x)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.pieces.mask is not None:
            x = x * per_row(self.pieces.mask, x)
        out = self.layer(x)
        for (down, up), columns in self.pieces.bypasses:  # (K*r, in), (out, K*r)
            hidden = F.linear(x, down.to(x.dtype))
            if columns is not None:
                hidden = hidden * per_row(columns, hidden)
            out = out + F.linear(hidden, up.to(x.dtype))
        return out


__all__ = ["AdaptedLinear", "per_row"]
