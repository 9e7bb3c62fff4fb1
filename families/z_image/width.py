"""Width units of Z-Image: attention heads and SwiGLU channel groups, the calibration inputs, the timestep features
a width router reads, and the measurement of each unit's share of a block's output (before the block's output norms:
Z-Image normalises the attention and MLP outputs before gating them, so the shares rank the units, they do not add up)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import Recorded, UnitMeter
from ..capabilities import WidthUnits
from .blocks import LINEARS, SwiGLU

if TYPE_CHECKING:
    from .adapter import ZImageArchitecture


class ZImageWidthUnits(WidthUnits):
    def __init__(self, arch: "ZImageArchitecture") -> None:
        self.arch = arch
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.in_channels, height, width, generator=generator)

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        batch = latent.shape[0]
        return {"x": latent, "timesteps": timestep, "context": latent.new_zeros(batch, text_tokens, self.arch.context_dim),
                "num_tokens": text_tokens}

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # adaln_input = t_embedder((1 - timestep) * time_scale): the host's own embedder, as its forward calls it
        return diffusion_model.t_embedder((1.0 - timestep) * diffusion_model.time_scale, dtype=dtype)

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        a = self.arch
        return {"attention.out": (("heads", 0, a.num_heads * a.head_dim),), "feed_forward.w2": (("groups", 0, a.mlp_hidden),)}

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.mlp_hidden)
        rows = b * (work.image_tokens + work.text_tokens)
        mlp_rows = b * (work.mlp_tokens + work.text_tokens)
        return {LINEARS[0]: (b, a.modulation_dim, 4 * d), LINEARS[1]: (rows, d, 3 * inner), LINEARS[2]: (rows, inner, d),
                LINEARS[3]: (mlp_rows, d, units), LINEARS[4]: (mlp_rows, d, units), LINEARS[5]: (mlp_rows, units, d)}

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        d = a.hidden_size
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        modulation = Recorded(module.adaLN_modulation)

        def gate(which: int) -> torch.Tensor:  # [scale_msa, gate_msa, scale_mlp, gate_mlp], the gates through tanh
            return modulation.output[:, (2 * which + 1) * d: (2 * which + 2) * d].tanh().unsqueeze(1)

        ff = module.feed_forward
        out = meter.output_linear(module.attention.out, [("heads", 0, a.head_dim)], lambda: gate(0))
        w2 = meter.output_linear(ff.w2, [("groups", 0, a.mlp_hidden // mlp_group_count)], lambda: gate(1))
        view = ModuleView(module, adaLN_modulation=modulation, attention=ModuleView(module.attention, out=out),
                          feed_forward=SwiGLU(ff, ff.w1, ff.w3, w2, None))
        img = type(module).forward(view, args["img"], args.get("mask"), args["pe"], args["vec"],
                                   transformer_options=args.get("transformer_options", {}))
        return {"img": img}, meter.mean("heads"), meter.mean("groups")
