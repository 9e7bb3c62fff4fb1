"""Width units of PixArt: self-attention heads and MLP channel groups (the cross-attention keeps its width), the
calibration inputs, the timestep features a width router reads, and the measurement of each unit's share of a block's
output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import TokenSubsetMLP, UnitMeter
from ..capabilities import WidthUnits

if TYPE_CHECKING:
    from .adapter import PixArtArchitecture

# The host sizes its position embeddings by round((H + W) / 2 / 64) latent pixels and divides by it: a calibration
# latent smaller than 48 on a side would not run, so calibration runs at least there (384 px).
MIN_CALIBRATION_SIDE = 48


class PixArtWidthUnits(WidthUnits):
    def __init__(self, arch: "PixArtArchitecture") -> None:
        self.arch = arch
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        side = MIN_CALIBRATION_SIDE
        return torch.randn(1, self.arch.in_channels, max(height, side), max(width, side), generator=generator)

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        return {"x": latent, "timesteps": timestep,
                "context": latent.new_zeros(latent.shape[0], text_tokens, self.arch.caption_channels)}

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return diffusion_model.t_embedder(timestep, dtype)  # t before the model's shared t_block, as the host embeds it

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        a = self.arch
        return {"attn.proj": (("heads", 0, a.hidden_size),), "mlp.fc2": (("groups", 0, a.mlp_hidden),)}

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.mlp_hidden)
        n, t, n_mlp = b * work.image_tokens, b * work.text_tokens, b * work.mlp_tokens
        return {
            "attn.qkv": (n, d, 3 * inner), "attn.proj": (n, inner, d),
            "cross_attn.q_linear": (n, d, d), "cross_attn.kv_linear": (t, d, 2 * d), "cross_attn.proj": (n, d, d),
            "mlp.fc1": (n_mlp, d, units), "mlp.fc2": (n_mlp, units, d),
        }

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        x, t = args["img"], args["vec"]

        def gate(index: int):  # the host's gate: row `index` of scale_shift_table + t, (B, 1, D)
            def read() -> torch.Tensor:
                table = module.scale_shift_table[None].to(dtype=x.dtype, device=x.device)
                return (table + t.reshape(x.shape[0], 6, -1))[:, index : index + 1]
            return read

        attn, mlp = module.attn, module.mlp
        proj = meter.output_linear(attn.proj, [("heads", 0, a.head_dim)], gate(2))
        fc2 = meter.output_linear(mlp.fc2, [("groups", 0, a.mlp_hidden // mlp_group_count)], gate(5))
        view = ModuleView(module, attn=ModuleView(attn, proj=proj), mlp=TokenSubsetMLP(mlp.fc1, mlp.act, fc2, None))
        out = type(module).forward(view, x, args["txt"], t, args.get("mask"), args.get("hw"))
        return {"img": out}, meter.mean("heads"), meter.mean("groups")
