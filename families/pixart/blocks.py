"""PixArt blocks run reduced: views over the host's own `PixArtMSBlock` whose self-attention keeps some heads and whose
MLP keeps some channel groups (or runs on a token subset), with LoRA-style extras on any linear. The host's block
`forward` then runs on the view.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...core.slicing import ModuleView, RunIndexCache
from ..base import BlockInternals
from ..block_views import FusedQkvSelections, ReducedBlock, TokenSubsetMLP

if TYPE_CHECKING:
    from .adapter import PixArtArchitecture

LINEARS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1", "mlp.fc2")
_CROSS = ("q_linear", "kv_linear", "proj")


class PixArtWidthSelections(FusedQkvSelections):
    family = "pixart"


class KeptHeadsAttention:
    """PixArt's self-attention (`AttentionKVCompress` without compression or q/k norms) on the kept heads: `qkv` gives
    their q, k and v rows, `proj` reads their columns; the host's own attention function runs on them."""

    def __init__(self, module: torch.nn.Module, qkv: Callable, proj: Callable, heads: int):
        self.attention = inspect.getmodule(type(module)).optimized_attention  # the host's, as its forward uses it
        self.qkv, self.proj, self.heads = qkv, proj, heads

    def __call__(self, x: torch.Tensor, mask: Any = None, HW: Any = None, block_id: Any = None) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, -1).unbind(2)
        return self.proj(self.attention(q, k, v, self.heads, mask=None))


class PerSampleText:
    """A linear over the host's packed (1, B*T, D) text, run as (B, T, D) so per-sample extras meet their sample."""

    def __init__(self, linear: Callable[[torch.Tensor], torch.Tensor], batch: int):
        self.linear, self.batch = linear, batch

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        out = self.linear(y.reshape(self.batch, -1, y.shape[-1]))
        return out.reshape(1, -1, out.shape[-1])


class ReducedPixArtBlock(ReducedBlock):
    """Builds the module view of one reduced PixArt block call."""

    def __init__(self, arch: "PixArtArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device, batch: int):
        self.arch, self.module, self.internals, self.flop_log, self.batch = arch, module, internals, flop_log, batch
        self.width = PixArtWidthSelections.cached(cache, arch, internals, device)

    def view(self) -> ModuleView:
        module, internals, width = self.module, self.internals, self.width
        adapted = internals.adapted_linears
        overrides: dict[str, Any] = {}
        attn = module.attn
        qkv = self.linear("attn.qkv", rows=width.qkv_rows)
        proj = self.linear("attn.proj", cols=width.head_cols)
        if width.head_cols is not None:
            overrides["attn"] = KeptHeadsAttention(attn, qkv, proj, width.head_count)
        elif "attn.qkv" in adapted or "attn.proj" in adapted:
            overrides["attn"] = ModuleView(attn, qkv=qkv, proj=proj)
        cross = module.cross_attn
        if any(name.startswith("cross_attn.") for name in adapted):  # LoRA only: cross-attention keeps its width
            linears = {name: self.linear(f"cross_attn.{name}") for name in _CROSS}
            if linears["kv_linear"] is not cross.kv_linear:
                linears["kv_linear"] = PerSampleText(linears["kv_linear"], self.batch)
            overrides["cross_attn"] = ModuleView(cross, **linears)
        mlp = module.mlp
        if width.units is not None or internals.mlp_tokens is not None or "mlp.fc1" in adapted or "mlp.fc2" in adapted:
            overrides["mlp"] = TokenSubsetMLP(self.linear("mlp.fc1", rows=width.units), mlp.act,
                                              self.linear("mlp.fc2", cols=width.units), internals.mlp_tokens)
        return ModuleView(module, **overrides)
