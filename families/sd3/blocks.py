"""SD3 joint blocks run reduced: views over the host's own `JointBlock` (its `block_mixing` runs on them) whose two
`DismantledBlock`s keep some heads (the fused qkv's q, k and v rows, the output projection's columns; the per-head
q/k norms are unchanged; MMDiT-X's second image self-attention thins with the same heads) and some MLP channel groups,
the image MLP on a token subset, LoRA-style extras on any linear."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ...core.slicing import ModuleView, RunIndexCache
from ..base import BlockInternals
from ..block_views import FusedQkvSelections, ReducedBlock, ReplacedModulation, TokenSubsetMLP

if TYPE_CHECKING:
    from .adapter import SD3Architecture

STREAMS = ("context_block", "x_block")


def stream_linears(pre_only: bool, second_attention: bool, stream: str) -> tuple[str, ...]:
    """The linears of one stream of a joint block, by module path in the block."""
    names = [f"{stream}.adaLN_modulation.1", f"{stream}.attn.qkv"]
    if not pre_only:
        names += [f"{stream}.attn.proj", f"{stream}.mlp.fc1", f"{stream}.mlp.fc2"]
    if second_attention:
        names += [f"{stream}.attn2.qkv", f"{stream}.attn2.proj"]
    return tuple(names)


class SD3WidthSelections(FusedQkvSelections):
    family = "sd3"


class ReducedSD3Block(ReducedBlock):
    """Builds the module view of one reduced SD3 joint block call."""

    def __init__(self, arch: "SD3Architecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        self.arch, self.module, self.internals, self.flop_log = arch, module, internals, flop_log
        self.width = SD3WidthSelections.cached(cache, arch, internals, device)

    def _attention(self, part: torch.nn.Module, path: str, pre_only: bool) -> ModuleView:
        width = self.width
        overrides: dict[str, Any] = {"num_heads": width.head_count, "qkv": self.linear(f"{path}.qkv", rows=width.qkv_rows)}
        if not pre_only:
            overrides["proj"] = self.linear(f"{path}.proj", cols=width.head_cols)
        return ModuleView(part, **overrides)

    def view(self) -> ModuleView:
        internals, width = self.internals, self.width
        streams = {}
        for stream in STREAMS:
            part = getattr(self.module, stream)
            overrides: dict[str, Any] = {"attn": self._attention(part.attn, f"{stream}.attn", part.pre_only)}
            if part.x_block_self_attn:
                overrides["attn2"] = self._attention(part.attn2, f"{stream}.attn2", False)
            if not part.pre_only:
                mlp = part.mlp
                tokens = internals.mlp_tokens if stream == "x_block" else None
                overrides["mlp"] = TokenSubsetMLP(self.linear(f"{stream}.mlp.fc1", rows=width.units), mlp.act,
                                                  self.linear(f"{stream}.mlp.fc2", cols=width.units), tokens)
            if f"{stream}.adaLN_modulation.1" in internals.adapted_linears:
                overrides["adaLN_modulation"] = ReplacedModulation(self.linear(f"{stream}.adaLN_modulation.1"), F.silu)
            streams[stream] = ModuleView(part, **overrides)
        return ModuleView(self.module, **streams)
