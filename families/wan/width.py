"""Width units of Wan: self-attention heads and FFN channel groups (cross-attention keeps its width),
the calibration inputs, the timestep features a width router reads, and the measurement of each unit's
share of a block's output."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import TokenSubsetMLP, UnitMeter
from ..capabilities import WidthUnits

if TYPE_CHECKING:
    from .adapter import WanArchitecture


class WanWidthUnits(WidthUnits):
    def __init__(self, arch: "WanArchitecture") -> None:
        self.arch = arch
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.ffn_dim

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.out_channels, 1, height, width, generator=generator)  # one latent frame

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        a, batch = self.arch, latent.shape[0]
        x = latent
        if a.in_channels > latent.shape[1]:  # i2v: the mask and image channels stay empty
            x = torch.cat((latent, latent.new_zeros(batch, a.in_channels - latent.shape[1], *latent.shape[2:])), dim=1)
        return {"x": x, "timestep": timestep, "context": latent.new_zeros(batch, text_tokens, a.text_dim)}

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # e = time_embedding(sinusoidal_embedding_1d(freq_dim, t)), with the host module's own embedding function
        embedding = inspect.getmodule(type(diffusion_model)).sinusoidal_embedding_1d
        return diffusion_model.time_embedding(embedding(self.arch.freq_dim, timestep.flatten()).to(dtype))

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        # q and k stay full (their RMSNorm spans every head), so masking o's columns removes a head exactly
        return {"self_attn.o": (("heads", 0, self.arch.hidden_size),), "ffn.2": (("groups", 0, self.arch.ffn_dim),)}

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.ffn_dim)
        n, t = b * work.image_tokens, b * work.text_tokens
        n_mlp = b * work.mlp_tokens
        return {
            "self_attn.q": (n, d, d), "self_attn.k": (n, d, d), "self_attn.v": (n, d, inner), "self_attn.o": (n, inner, d),
            "cross_attn.q": (n, d, d), "cross_attn.k": (t, d, d), "cross_attn.v": (t, d, d), "cross_attn.o": (n, d, d),
            # image-conditioning context tokens are not in BlockWork: the i2v bypass FLOPs there count as 0
            "cross_attn.k_img": (0, d, d), "cross_attn.v_img": (0, d, d),
            "ffn.0": (n_mlp, d, units), "ffn.2": (n_mlp, units, d),
        }

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        x, vec = args["img"], args["vec"]
        repeat_e = inspect.getmodule(type(module)).repeat_e

        def gate(index: int):  # the host's gate e[index] of this block, spread over the tokens as it spreads it
            def read() -> torch.Tensor:
                modulation = module.modulation.to(dtype=x.dtype, device=x.device)
                e = (modulation + vec).chunk(6, dim=1) if vec.ndim < 4 else (modulation.unsqueeze(0) + vec).unbind(2)
                chunk = e[index]
                return repeat_e(chunk, x)
            return read

        attn, ffn = module.self_attn, module.ffn
        o = meter.output_linear(attn.o, [("heads", 0, a.head_dim)], gate(2))
        ffn_out = meter.output_linear(ffn[2], [("groups", 0, a.ffn_dim // mlp_group_count)], gate(5))
        view = ModuleView(module, self_attn=ModuleView(attn, o=o), ffn=TokenSubsetMLP(ffn[0], ffn[1], ffn_out, None))
        out = type(module).forward(
            view, x, e=vec, freqs=args["pe"], context=args["txt"], context_img_len=args.get("context_img_len"),
            transformer_options=args.get("transformer_options", {}),
        )
        return {"img": out}, meter.mean("heads"), meter.mean("groups")
