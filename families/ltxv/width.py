"""Width units of LTX-Video: self-attention heads and feed-forward channel groups (the cross-attention keeps its width),
the calibration inputs, the timestep features a width router reads, and the measurement of each unit's share of a
block's output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import TokenSubsetMLP, UnitMeter
from ..capabilities import WidthUnits
from .blocks import gelu_tanh

if TYPE_CHECKING:
    from .adapter import LTXVAdapter, LTXVArchitecture

_TIMESTEP_SCALE = 1000.0  # the model embeds 1000 * the timestep it is called with (sigma)


class LTXVWidthUnits(WidthUnits):
    def __init__(self, arch: "LTXVArchitecture", adapter: "LTXVAdapter") -> None:
        self.arch, self.adapter = arch, adapter
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.in_channels, 1, height, width, generator=generator)  # one latent frame

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        batch = latent.shape[0]
        return {"x": latent, "timestep": timestep, "context": latent.new_zeros(batch, text_tokens, self.arch.caption_channels),
                "attention_mask": latent.new_ones(batch, text_tokens)}

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # the adaLN-single embedding of 1000 * t, before its modulation linear, as the host's forward embeds it
        t = timestep.flatten() * _TIMESTEP_SCALE
        return diffusion_model.adaln_single(t, {"resolution": None, "aspect_ratio": None}, batch_size=t.shape[0],
                                            hidden_dtype=dtype)[1]

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        # q and k stay full (their norm and RoPE span every head), so masking to_out's columns removes a head exactly
        return {"attn1.to_out.0": (("heads", 0, self.arch.hidden_size),), "ff.net.2": (("groups", 0, self.arch.mlp_hidden),)}

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        return self.adapter.linear_sizes(block, work)

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        x, vec = args["img"], args["vec"]

        def gate(index: int):  # the host's gate of this block: row `index` of scale_shift_table + the timestep's
            def read() -> torch.Tensor:
                table = module.scale_shift_table[None, None].to(dtype=x.dtype, device=x.device)
                return (table + vec.reshape(x.shape[0], vec.shape[1], 6, -1))[:, :, index]
            return read

        attn, ff = module.attn1, module.ff
        out_proj = meter.output_linear(attn.to_out[0], [("heads", 0, a.head_dim)], gate(2))
        ff_out = meter.output_linear(ff.net[2], [("groups", 0, a.mlp_hidden // mlp_group_count)], gate(5))
        view = ModuleView(module, attn1=ModuleView(attn, to_out=out_proj), ff=TokenSubsetMLP(ff.net[0].proj, gelu_tanh, ff_out, None))
        out = type(module).forward(view, x.clone(), context=args["txt"], attention_mask=args.get("attention_mask"),
                                   timestep=vec, pe=args["pe"], transformer_options=args.get("transformer_options", {}))
        return {"img": out}, meter.mean("heads"), meter.mean("groups")
