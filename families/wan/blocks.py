"""Wan blocks run reduced: views over the host's own `WanAttentionBlock` whose self-attention keeps
some heads and whose FFN keeps some channel groups (or runs on a token subset), with LoRA-style extras
on any linear. The host's block `forward` then runs on the view.

Wan normalises q and k with one RMSNorm over the full width D (all heads together), so a kept head's
normalised q depends on every head's q. To stay exact, q and k are projected in full and normalised by
the host's own norm, then the kept heads' channels are taken; v is projected only for the kept heads,
and attention and the output projection shrink with them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...core.slicing import AxisSelection, ModuleView, RunIndexCache
from ..base import BlockInternals
from ..block_views import KeptHeadsAfterNorm, ReducedBlock, TokenSubsetMLP, UnitSelections

if TYPE_CHECKING:
    from .adapter import WanArchitecture

_CROSS_LINEARS = ("q", "k", "v", "o", "k_img", "v_img")


class WanWidthSelections(UnitSelections):
    """The kept heads and FFN groups of one decision as weight-axis selections (built once, cached per run)."""

    family = "wan"

    def __init__(self, arch: "WanArchitecture", heads: tuple[int, ...] | None, groups: tuple[int, ...] | None,
                 group_count: int, device: torch.device | None):
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.head_cols = None if heads is None else AxisSelection.of_units(heads, arch.head_dim)
        self.units = None if groups is None else AxisSelection.of_units(groups, arch.ffn_dim // group_count)
        self._build_indices(device)


class ReducedWanBlock(ReducedBlock):
    """Builds the module view of one reduced Wan block call."""

    def __init__(self, arch: "WanArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        self.arch, self.module, self.internals, self.flop_log = arch, module, internals, flop_log
        self.width = WanWidthSelections.cached(cache, arch, internals, device)

    def view(self) -> ModuleView:
        module, internals, width = self.module, self.internals, self.width
        adapted = internals.adapted_linears
        overrides: dict[str, Any] = {}
        attn, heads = module.self_attn, width.head_cols
        if heads is not None or any(name.startswith("self_attn.") for name in adapted):
            overrides["self_attn"] = ModuleView(
                attn,
                num_heads=width.head_count,
                q=self.linear("self_attn.q"),  # in full: the RMSNorm spans every head
                k=self.linear("self_attn.k"),
                norm_q=attn.norm_q if heads is None else KeptHeadsAfterNorm(attn.norm_q, heads),
                norm_k=attn.norm_k if heads is None else KeptHeadsAfterNorm(attn.norm_k, heads),
                v=self.linear("self_attn.v", rows=heads),
                o=self.linear("self_attn.o", cols=heads),
            )
        cross = module.cross_attn
        if any(name.startswith("cross_attn.") for name in adapted):  # LoRA only: cross-attention keeps its width
            overrides["cross_attn"] = ModuleView(cross, **{
                name: self.linear(f"cross_attn.{name}") for name in _CROSS_LINEARS if hasattr(cross, name)
            })
        ffn = module.ffn
        if width.units is not None or internals.mlp_tokens is not None or "ffn.0" in adapted or "ffn.2" in adapted:
            overrides["ffn"] = TokenSubsetMLP(
                self.linear("ffn.0", rows=width.units), ffn[1], self.linear("ffn.2", cols=width.units),
                internals.mlp_tokens,
            )
        return ModuleView(module, **overrides)
