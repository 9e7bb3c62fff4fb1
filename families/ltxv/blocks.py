"""LTX-Video blocks run reduced: views over the host's own `BasicTransformerBlock` whose linears carry LoRA-style
extras (TD-LoRA) and whose feed-forward runs on a token subset (DyDiT's SDT). The host's block `forward` then runs on
the view. Attention keeps its width here: its q and k norms span every head, and so do its RoPE tables (one table over
the whole width D), so kept heads need their channels of both; the Width Patcher does not offer this family yet.
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.slicing import ModuleView
from ..base import BlockInternals
from ..block_views import ReducedBlock, TokenSubsetMLP

LINEARS = (
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
    "ff.net.0.proj", "ff.net.2",
)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")  # the host's GELU_approx after its projection


class ReducedLTXVBlock(ReducedBlock):
    """Builds the module view of one reduced LTX-Video block call."""

    def __init__(self, module: torch.nn.Module, internals: BlockInternals, flop_log: list[float]):
        super().__init__(module, internals, flop_log)

    def view(self) -> ModuleView | torch.nn.Module:
        module, internals = self.module, self.internals
        adapted = internals.adapted_linears
        overrides: dict[str, Any] = {}
        for name in ("attn1", "attn2"):
            if any(linear.startswith(f"{name}.") for linear in adapted):
                attn = getattr(module, name)
                overrides[name] = ModuleView(attn, to_q=self.linear(f"{name}.to_q"), to_k=self.linear(f"{name}.to_k"),
                                             to_v=self.linear(f"{name}.to_v"), to_out=self.linear(f"{name}.to_out.0"))
        if internals.mlp_tokens is not None or "ff.net.0.proj" in adapted or "ff.net.2" in adapted:
            overrides["ff"] = TokenSubsetMLP(self.linear("ff.net.0.proj"), _gelu_tanh, self.linear("ff.net.2"),
                                             internals.mlp_tokens)
        return ModuleView(module, **overrides) if overrides else module
