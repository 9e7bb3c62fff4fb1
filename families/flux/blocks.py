"""Flux blocks run reduced, and measured: views over the host's own block classes.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ...core.slicing import AxisSelection, ModuleView, RunIndexCache, gather_tokens, scatter_tokens
from ..base import BlockInternals
from ..block_views import ReducedBlock, TokenSubsetMLP, UnitSelections, forward_parameters

if TYPE_CHECKING:
    from .adapter import FluxArchitecture

def call_forward(block_class: type, view: Any, args: Mapping[str, Any]) -> Any:
    """Call the host block class's own forward on `view` the way ComfyUI's block wrapper calls the
    block: the stream tensors, then the keyword arguments this host version's forward accepts."""
    accepted = forward_parameters(block_class)
    kwargs = {k: args[k] for k in ("vec", "pe", "attn_mask", "transformer_options") if k in args and k in accepted}
    if "txt" in args:  # double-stream block
        return block_class.forward(view, img=args["img"], txt=args["txt"], **kwargs)
    return block_class.forward(view, args["img"], **kwargs)


class _SplitLinear1:
    """Single-block linear1 when only some tokens run the MLP: qkv for all, MLP input for the selected."""

    def __init__(self, qkv: Callable, mlp_in: Callable, rows: torch.Tensor):
        self.qkv, self.mlp_in, self.rows = qkv, mlp_in, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        selected = self.mlp_in(gather_tokens(x, self.rows))
        mlp = scatter_tokens(x.new_zeros(*x.shape[:-1], selected.shape[-1]), self.rows, selected)
        return torch.cat((qkv, mlp), dim=-1)


class _SplitLinear2:
    """Single-block linear2 when only some tokens ran the MLP: the MLP columns only for those tokens."""

    def __init__(self, attn_out: Callable, mlp_out: Callable, rows: torch.Tensor, attn_width: int):
        self.attn_out, self.mlp_out, self.rows, self.attn_width = attn_out, mlp_out, rows, attn_width

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = self.attn_out(z[..., : self.attn_width])
        selected = self.mlp_out(gather_tokens(z[..., self.attn_width :], self.rows))
        return out.scatter_add(1, self.rows[..., None].expand(-1, -1, out.shape[-1]), selected)


class WidthSelections(UnitSelections):
    """The kept heads and MLP groups of one decision as weight-axis selections (built once, cached per run)."""

    family = "flux"

    def __init__(self, arch: "FluxArchitecture", heads: tuple[int, ...] | None, groups: tuple[int, ...] | None,
                 group_count: int, device: torch.device | None):
        d, hd, mlp = arch.hidden_size, arch.head_dim, arch.mlp_hidden
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.unit_count = mlp if groups is None else len(groups) * (mlp // group_count)
        all_heads, all_units = AxisSelection.span(0, d), AxisSelection.span(0, mlp)
        self.head_cols = None if heads is None else AxisSelection.of_units(heads, hd)
        self.units = None if groups is None else AxisSelection.of_units(groups, mlp // group_count)
        head_cols = self.head_cols or all_heads
        units = self.units or all_units
        # q, k and v of the kept heads (the rows of a fused qkv)
        self.qkv_rows = None if heads is None else head_cols + head_cols.shifted(d) + head_cols.shifted(2 * d)
        qkv_rows = self.qkv_rows or AxisSelection.span(0, 3 * d)
        # the MLP's first linear: a unit's row, and with SwiGLU (Flux 2) also its row in the up half [gate | up]
        mlp_in = units + units.shifted(mlp) if arch.gated_mlp else units
        self.mlp_in_rows = None if groups is None else mlp_in
        self.mlp_in_width = self.unit_count * (2 if arch.gated_mlp else 1)
        # single blocks: linear1 = [q | k | v | mlp in], linear2 = [attention | mlp] columns
        self.linear1_rows = qkv_rows + mlp_in.shifted(3 * d)
        self.linear2_cols = head_cols + units.shifted(d)
        self.linear1_qkv_rows = qkv_rows
        self.linear1_mlp_rows = mlp_in.shifted(3 * d)
        self.linear2_attn_cols = head_cols
        self.linear2_mlp_cols = units.shifted(d)
        self._build_indices(device)


def text_positions(cache: RunIndexCache, text_tokens: int, batch: int, device: torch.device) -> torch.Tensor:
    """(B, T) positions 0..T-1 of the text tokens, made once per run and shape."""
    return cache.get(("flux.text", text_tokens, batch, device),
                     lambda: torch.arange(text_tokens, device=device).expand(batch, -1))


class ReducedFluxBlock(ReducedBlock):
    """Builds the module views of one reduced Flux block call."""

    def __init__(self, arch: "FluxArchitecture", module: torch.nn.Module, internals: BlockInternals,
                 flop_log: list[float], cache: RunIndexCache, device: torch.device):
        self.arch, self.module, self.internals, self.flop_log, self.cache = arch, module, internals, flop_log, cache
        self.width = WidthSelections.cached(cache, arch, internals, device)

    def modulation(self, module: torch.nn.Module, name: str):
        if f"{name}.lin" not in self.internals.adapted_linears:
            return module
        return ModuleView(module, lin=self.linear(f"{name}.lin"))

    def double_view(self) -> ModuleView:
        width = self.width
        overrides: dict[str, Any] = {"num_heads": width.head_count}
        for stream in ("img", "txt"):
            attn, mlp = getattr(self.module, f"{stream}_attn"), getattr(self.module, f"{stream}_mlp")
            overrides[f"{stream}_attn"] = ModuleView(
                attn,
                qkv=self.linear(f"{stream}_attn.qkv", rows=width.qkv_rows),
                proj=self.linear(f"{stream}_attn.proj", cols=width.head_cols),
            )
            overrides[f"{stream}_mlp"] = TokenSubsetMLP(
                self.linear(f"{stream}_mlp.0", rows=width.mlp_in_rows),
                mlp[1],
                self.linear(f"{stream}_mlp.2", cols=width.units),
                self.internals.mlp_tokens if stream == "img" else None,
            )
            if not self.arch.shared_modulation:
                overrides[f"{stream}_mod"] = self.modulation(getattr(self.module, f"{stream}_mod"), f"{stream}_mod")
        return ModuleView(self.module, **overrides)

    def single_view(self, text_tokens: int) -> ModuleView:
        module, internals, width = self.module, self.internals, self.width
        overrides: dict[str, Any] = {
            "num_heads": width.head_count,
            "hidden_size": width.head_count * self.arch.head_dim,
            "mlp_hidden_dim_first": width.mlp_in_width,
        }
        if not self.arch.shared_modulation:
            overrides["modulation"] = self.modulation(module.modulation, "modulation")
        if internals.mlp_tokens is None:
            reduced = internals.heads is not None or internals.mlp_groups is not None
            overrides["linear1"] = self.linear("linear1", rows=width.linear1_rows if reduced else None)
            overrides["linear2"] = self.linear("linear2", cols=width.linear2_cols if reduced else None)
        else:
            tokens = internals.mlp_tokens
            text = text_positions(self.cache, text_tokens, tokens.shape[0], tokens.device)
            rows = torch.cat((text, tokens + text_tokens), dim=1)
            overrides["linear1"] = _SplitLinear1(
                self.linear("linear1", rows=width.linear1_qkv_rows),
                self.linear("linear1", rows=width.linear1_mlp_rows),
                rows,
            )
            overrides["linear2"] = _SplitLinear2(
                self.linear("linear2", cols=width.linear2_attn_cols),
                self.linear("linear2", cols=width.linear2_mlp_cols, bias=False),
                rows,
                width.head_count * self.arch.head_dim,
            )
        return ModuleView(module, **overrides)
