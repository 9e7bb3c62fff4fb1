"""Analytic FLOP accounting and a FlopCounterMode that also counts CPU attention.

FLOPs follow `torch.utils.flop_counter`: a matmul of (m x k) by (k x n) is 2*m*k*n, elementwise
work (norms, RoPE, activations, softmax) is not counted. That makes the analytic numbers directly
comparable with what `FlopCounterMode` measures.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs of one model call (or part of it), split the way telemetry reports them."""

    embed: float = 0.0  # img_in, txt_in, timestep / guidance / vector embedders
    modulation: float = 0.0  # adaLN modulation linears of the blocks
    qkv: float = 0.0
    attention: float = 0.0  # scores (q k^T) and the weighted sum of values
    proj: float = 0.0  # attention output projection
    mlp: float = 0.0
    final: float = 0.0  # final layer and its modulation
    extra: float = 0.0  # work a method adds (routers, LoRA bypasses, resizes)

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        return FlopBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scaled(self, factor: float) -> "FlopBreakdown":
        return FlopBreakdown(**{f.name: getattr(self, f.name) * factor for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


ZERO = FlopBreakdown()


def linear_flops(tokens: float, in_features: float, out_features: float) -> float:
    return 2.0 * tokens * in_features * out_features


def attention_flops(batch: float, heads: float, query_len: float, key_len: float, head_dim: float) -> float:
    """q k^T plus the weighted sum of v."""
    return 4.0 * batch * heads * query_len * key_len * head_dim


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_targets() -> dict:
    # torch registers FLOP formulas for the CUDA attention kernels only; on the CPU
    # scaled_dot_product_attention lands in this op and would be counted as zero.
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_sdpa_flops} if op is not None else {}


def measure_flops(fn: Callable[[], object]) -> tuple[float, object]:
    """Run `fn` under FlopCounterMode (with CPU attention counted) and return (flops, result)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_targets())
    with counter:
        result = fn()
    return float(counter.get_total_flops()), result
