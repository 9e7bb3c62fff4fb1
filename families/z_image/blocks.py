"""Z-Image blocks run reduced: views over the host's own `JointTransformerBlock` with fewer heads (the fused qkv's
q, k and v rows of the kept heads, the output projection's columns; the per-head q/k norms are unchanged), fewer
SwiGLU channel groups (w1 and w3 rows, w2 columns), the MLP on a token subset, LoRA-style extras on any linear."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from ...core.slicing import AxisSelection, ModuleView, RunIndexCache, gather_tokens, scatter_tokens
from ..base import BlockInternals
from ..block_views import ReducedBlock, ReplacedModulation, UnitSelections

if TYPE_CHECKING:
    from .adapter import ZImageArchitecture

LINEARS = ("adaLN_modulation.0", "attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class ZImageWidthSelections(UnitSelections):
    family = "z_image"

    def __init__(self, arch: "ZImageArchitecture", heads: tuple[int, ...] | None, groups: tuple[int, ...] | None,
                 group_count: int, device: torch.device | None):
        inner = arch.num_heads * arch.head_dim
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.head_cols = None if heads is None else AxisSelection.of_units(heads, arch.head_dim)
        self.qkv_rows = None if heads is None else self.head_cols + self.head_cols.shifted(inner) + self.head_cols.shifted(2 * inner)
        self.units = None if groups is None else AxisSelection.of_units(groups, arch.mlp_hidden // group_count)
        self._build_indices(device)


class SwiGLU:
    """The host's FeedForward (w2(silu(w1 x) * w3 x), its own gating function) on narrowed linears and, with
    `tokens`, on those rows only (the others get zero output: they skip the MLP)."""

    def __init__(self, module: torch.nn.Module, w1: Callable, w3: Callable, w2: Callable, tokens: torch.Tensor | None):
        self.gate, self.w1, self.w3, self.w2, self.tokens = module._forward_silu_gating, w1, w3, w2, tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return self.w2(self.gate(self.w1(x), self.w3(x)))
        rows = gather_tokens(x, self.tokens)
        out = self.w2(self.gate(self.w1(rows), self.w3(rows)))
        return scatter_tokens(x.new_zeros(*x.shape[:-1], out.shape[-1]), self.tokens, out)


class ReducedZImageBlock(ReducedBlock):
    """Builds the module view of one reduced Z-Image block call."""

    def __init__(self, arch: "ZImageArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        self.arch, self.module, self.internals, self.flop_log, self.cache = arch, module, internals, flop_log, cache
        self.width = ZImageWidthSelections.cached(cache, arch, internals, device)

    def view(self, mlp_rows: torch.Tensor | None) -> ModuleView:
        module, width = self.module, self.width
        attention, ff = module.attention, module.feed_forward
        overrides: dict[str, Any] = {
            "attention": ModuleView(attention, n_local_heads=width.head_count, n_local_kv_heads=width.head_count,
                                    qkv=self.linear("attention.qkv", rows=width.qkv_rows),
                                    out=self.linear("attention.out", cols=width.head_cols)),
            "feed_forward": SwiGLU(ff, self.linear("feed_forward.w1", rows=width.units), self.linear("feed_forward.w3", rows=width.units),
                                   self.linear("feed_forward.w2", cols=width.units), mlp_rows),
        }
        if "adaLN_modulation.0" in self.internals.adapted_linears:
            overrides["adaLN_modulation"] = ReplacedModulation(self.linear("adaLN_modulation.0"))
        return ModuleView(module, **overrides)
