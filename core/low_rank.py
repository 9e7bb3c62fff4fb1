"""Low-rank addends on a block's linears, as the executor's `BlockInternals.extras` take them: shared by
TD-LoRA (gated experts on every call) and the patch scheduler (a block LoRA on trained coarse calls only)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .flops import linear_flops
from .slicing import AxisSelection


def expert_columns(gates: torch.Tensor, rank: int) -> torch.Tensor:
    """(B, K) gates -> (B, K * rank): each expert's gate over its rank columns (experts stacked expert-major)."""
    return gates.repeat_interleave(rank, dim=1)


class GatedBypass:
    """The addend of one layer for one model call: ((x A^T) * column gates) B^T, sliced like the layer."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, column_gates: torch.Tensor | None):
        self.down, self.up, self.column_gates = down, up, column_gates  # up carries strength * alpha / r

    def __call__(self, x: torch.Tensor, rows: AxisSelection | None, cols: AxisSelection | None) -> torch.Tensor:
        down = self.down if cols is None else cols.take(self.down, 1)
        up = self.up if rows is None else rows.take(self.up, 0)
        hidden = F.linear(x, down)
        if self.column_gates is not None:
            gates = self.column_gates
            if gates.shape[0] != x.shape[0]:
                raise RuntimeError(
                    f"TD-LoRA: a layer received a batch of {x.shape[0]} but the gates were computed for {gates.shape[0]} samples"
                )
            hidden = hidden * gates.view(gates.shape[0], *([1] * (x.ndim - 2)), gates.shape[1])
        return F.linear(hidden, up)

    def flops(self, tokens: int, in_features: int, out_features: int) -> float:
        return linear_flops(tokens, in_features, self.down.shape[0]) + linear_flops(tokens, self.down.shape[0], out_features)


class SummedExtra:
    """Two extras on the same linear (another method's and ours): both addends."""

    def __init__(self, first: Any, second: Any):
        self.first, self.second = first, second

    def __call__(self, x: torch.Tensor, rows: AxisSelection | None, cols: AxisSelection | None) -> torch.Tensor:
        return self.first(x, rows, cols) + self.second(x, rows, cols)

    def flops(self, tokens: int, in_features: int, out_features: int) -> float:
        return self.first.flops(tokens, in_features, out_features) + self.second.flops(tokens, in_features, out_features)


__all__ = ["GatedBypass", "SummedExtra", "expert_columns"]
