"""Qwen-Image blocks run reduced: views over the host's own `QwenImageTransformerBlock` with fewer heads (q, k, v
and output projections of both streams narrowed; the per-head RMSNorms are unchanged), fewer MLP channel groups,
the image MLP on a token subset (the reference tokens of an edit always run it), LoRA-style extras on any linear.
The host's block `forward` then runs on the view, called as the host's block wrapper calls it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ...core.slicing import AxisSelection, ModuleView, RunIndexCache
from ..base import BlockInternals
from ..block_views import ReducedBlock, ReplacedModulation, TokenSubsetMLP, UnitSelections, forward_parameters

if TYPE_CHECKING:
    from ..capabilities import CallLayout
    from .adapter import QwenImageArchitecture

STREAM_LINEARS = {  # per stream: modulation, q, k, v, output projection, MLP in, MLP out (module paths in the block)
    "img": ("img_mod.1", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "img_mlp.net.0.proj", "img_mlp.net.2"),
    "txt": ("txt_mod.1", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "txt_mlp.net.0.proj",
            "txt_mlp.net.2"),
}
def call_block(block_class: type, view: Any, args: Mapping[str, Any], layout: "CallLayout", **replaced: Any) -> tuple:
    """The host block class's forward on `view`, with the arguments the host's block wrapper passes: the patch's
    streams, plus what the wrapper takes from the host's scope (the text mask; on hosts that have it, where the
    reference tokens start when they are modulated at timestep 0). Returns (txt, img) as the block does."""
    accepted = forward_parameters(block_class)
    img = args["img"]
    kwargs = dict(hidden_states=img, encoder_hidden_states=args["txt"], encoder_hidden_states_mask=layout.block_context,
                  temb=args["vec"], image_rotary_emb=args["pe"], transformer_options=args.get("transformer_options", {}))
    if "timestep_zero_index" in accepted:
        kwargs["timestep_zero_index"] = img.shape[1] - layout.reference_tokens if layout.references_at_time_zero else None
    kwargs.update(replaced)
    return block_class.forward(view, **kwargs)


class QwenWidthSelections(UnitSelections):
    family = "qwen_image"

    def __init__(self, arch: "QwenImageArchitecture", heads: tuple[int, ...] | None, groups: tuple[int, ...] | None,
                 group_count: int, device: torch.device | None):
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.head_rows = None if heads is None else AxisSelection.of_units(heads, arch.head_dim)
        self.units = None if groups is None else AxisSelection.of_units(groups, arch.mlp_hidden // group_count)
        self._build_indices(device)


def mlp_parts(mlp: torch.nn.Module) -> tuple[torch.nn.Module, Callable, torch.nn.Module]:
    """(first linear, activation, last linear) of the host's FeedForward (its dropout is the identity at p = 0)."""
    gelu = mlp.net[0]
    return gelu.proj, lambda h: F.gelu(h, approximate=gelu.approximate), mlp.net[2]


def reference_rows(cache: RunIndexCache, tokens: torch.Tensor, generated: int, references: int) -> torch.Tensor:
    """`tokens` (B, k) of the generated image followed by every reference token's row (they always run the MLP)."""
    if not references:
        return tokens
    tail = cache.get(("qwen.references", generated, references, tokens.shape[0], tokens.device),
                     lambda: torch.arange(generated, generated + references, device=tokens.device).expand(tokens.shape[0], -1))
    return torch.cat((tokens, tail), dim=1)


class ReducedQwenBlock(ReducedBlock):
    """Builds the module view of one reduced Qwen-Image block call."""

    def __init__(self, arch: "QwenImageArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        self.arch, self.module, self.internals, self.flop_log, self.cache = arch, module, internals, flop_log, cache
        self.width = QwenWidthSelections.cached(cache, arch, internals, device)

    def view(self, image_tokens: int, references: int) -> ModuleView:
        module, internals, width = self.module, self.internals, self.width
        heads, units = width.head_rows, width.units
        attn = module.attn
        img, txt = STREAM_LINEARS["img"], STREAM_LINEARS["txt"]
        overrides: dict[str, Any] = {"attn": ModuleView(
            attn,
            heads=width.head_count,
            **{name.split(".")[1]: self.linear(name, rows=heads) for name in (*img[1:4], *txt[1:4])},
            to_out=[self.linear(img[4], cols=heads), attn.to_out[1]],
            to_add_out=self.linear(txt[4], cols=heads),
        )}
        for stream, names in STREAM_LINEARS.items():
            if names[0] in internals.adapted_linears:
                overrides[f"{stream}_mod"] = ReplacedModulation(self.linear(names[0]), F.silu)
            first, act, _ = mlp_parts(getattr(module, f"{stream}_mlp"))
            tokens = internals.mlp_tokens if stream == "img" else None
            if tokens is not None:
                tokens = reference_rows(self.cache, tokens, image_tokens - references, references)
            overrides[f"{stream}_mlp"] = TokenSubsetMLP(self.linear(names[5], rows=units), act, self.linear(names[6], cols=units), tokens)
        return ModuleView(module, **overrides)
