"""LTX-Video blocks run reduced: views over the host's own `BasicTransformerBlock` whose self-attention keeps some heads
and whose feed-forward keeps some channel groups (or runs on a token subset), with LoRA-style extras on any linear. The
host's block `forward` then runs on the view.

LTX-Video normalises q and k with one RMSNorm over the full width (all heads together) and rotates them with one RoPE
table over the full width, so a kept head's q depends on every head's q. To stay exact, q and k are projected in full
and normalised by the host's own norm, then the kept heads' channels are taken, and the block gets the kept heads'
part of the RoPE table (`kept_head_positions`); v is projected only for the kept heads, and attention and the output
projection shrink with them. Cross-attention to the text keeps its width.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...core.slicing import AxisSelection, ModuleView, RunIndexCache
from ..base import BlockInternals
from ..block_views import KeptHeadsAfterNorm, ReducedBlock, TokenSubsetMLP, UnitSelections

if TYPE_CHECKING:
    from .adapter import LTXVArchitecture

LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")  # the host's GELU_approx after its projection


class LTXVWidthSelections(UnitSelections):
    """The kept heads and feed-forward groups of one decision as weight-axis selections (built once, cached per run),
    with the kept heads' parts of each host's RoPE tables."""

    family = "ltxv"

    def __init__(self, arch: "LTXVArchitecture", heads: tuple[int, ...] | None, groups: tuple[int, ...] | None,
                 group_count: int, device: torch.device | None):
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.head_cols = None if heads is None else AxisSelection.of_units(heads, arch.head_dim)
        self.head_pairs = None if heads is None else AxisSelection.of_units(heads, arch.head_dim // 2)
        self.head_rows = None if heads is None else AxisSelection.of_units(heads, 1)
        self.units = None if groups is None else AxisSelection.of_units(groups, arch.mlp_hidden // group_count)
        self._build_indices(device)

    def kept_head_positions(self, pe: Any) -> Any:
        """The RoPE tables for the kept heads' channels: 0.3.75's (B, 1, N, D/2, 2, 2) by channel pairs, 0.12.1's
        interleaved (cos, sin) of (B, N, D) by channels, its split ones (B, H, N, d/2) by heads."""
        if isinstance(pe, torch.Tensor):
            return self.head_pairs.take(pe, 3)
        cos, sin, *rest = pe
        if rest and rest[0]:  # split
            return type(pe)((self.head_rows.take(cos, 1), self.head_rows.take(sin, 1), *rest))
        return type(pe)((self.head_cols.take(cos, 2), self.head_cols.take(sin, 2), *rest))


class ReducedLTXVBlock(ReducedBlock):
    """Builds the module view of one reduced LTX-Video block call."""

    def __init__(self, arch: "LTXVArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        super().__init__(module, internals, flop_log)
        self.width = LTXVWidthSelections.cached(cache, arch, internals, device)

    def view(self) -> ModuleView | torch.nn.Module:
        module, internals, width = self.module, self.internals, self.width
        adapted = internals.adapted_linears
        overrides: dict[str, Any] = {}
        attn, heads = module.attn1, width.head_cols
        if heads is not None or any(name.startswith("attn1.") for name in adapted):
            overrides["attn1"] = ModuleView(
                attn, heads=width.head_count,
                to_q=self.linear("attn1.to_q"), to_k=self.linear("attn1.to_k"),  # in full: the norms span every head
                q_norm=attn.q_norm if heads is None else KeptHeadsAfterNorm(attn.q_norm, heads),
                k_norm=attn.k_norm if heads is None else KeptHeadsAfterNorm(attn.k_norm, heads),
                to_v=self.linear("attn1.to_v", rows=heads), to_out=self.linear("attn1.to_out.0", cols=heads),
            )
        if any(name.startswith("attn2.") for name in adapted):  # LoRA only: cross-attention keeps its width
            overrides["attn2"] = ModuleView(module.attn2, to_q=self.linear("attn2.to_q"), to_k=self.linear("attn2.to_k"),
                                            to_v=self.linear("attn2.to_v"), to_out=self.linear("attn2.to_out.0"))
        if width.units is not None or internals.mlp_tokens is not None or "ff.net.0.proj" in adapted or "ff.net.2" in adapted:
            overrides["ff"] = TokenSubsetMLP(self.linear("ff.net.0.proj", rows=width.units), gelu_tanh,
                                             self.linear("ff.net.2", cols=width.units), internals.mlp_tokens)
        return ModuleView(module, **overrides) if overrides else module

    def positions(self, pe: Any) -> Any:
        """The RoPE tables the block's self-attention gets: the kept heads' part when heads are left out."""
        return pe if self.width.head_cols is None else self.width.kept_head_positions(pe)
