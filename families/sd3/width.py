"""Width units of SD3: attention heads (shared by the joint attention of both streams and MMDiT-X's second image
self-attention) and MLP channel groups, the calibration inputs, the timestep features a width router reads, and the
measurement of each unit's share of a block's output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import Recorded, TokenSubsetMLP, UnitMeter
from ..capabilities import WidthUnits
from .blocks import STREAMS

if TYPE_CHECKING:
    from .adapter import SD3Adapter, SD3Architecture


class SD3WidthUnits(WidthUnits):
    def __init__(self, arch: "SD3Architecture", adapter: "SD3Adapter") -> None:
        self.arch, self.adapter = arch, adapter
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.in_channels, height, width, generator=generator)

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        a, batch = self.arch, latent.shape[0]
        arguments: dict[str, Any] = {"x": latent, "timesteps": timestep, "context": latent.new_zeros(batch, text_tokens, a.context_dim)}
        if a.pooled_dim is not None:
            arguments["y"] = latent.new_zeros(batch, a.pooled_dim)
        return arguments

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return diffusion_model.t_embedder(timestep, dtype=dtype)  # c before the pooled text is added, as the host embeds it

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        a = self.arch
        columns = {}
        for name in self.adapter.linear_names(block):
            if name.endswith(".proj"):
                columns[name] = (("heads", 0, a.hidden_size),)
            elif name.endswith("mlp.fc2"):
                columns[name] = (("groups", 0, a.mlp_hidden),)
        return columns

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.mlp_hidden)
        n_mlp = work.mlp_tokens
        sizes = {}
        for name in self.adapter.linear_names(block):
            stream, part, layer = name.split(".", 2)
            tokens = work.image_tokens if stream == "x_block" else work.text_tokens
            mlp_tokens = n_mlp if stream == "x_block" else work.text_tokens
            sizes[name] = {
                ("adaLN_modulation", "1"): (b, d, self.adapter.modulation_width(block, stream)),
                ("attn", "qkv"): (b * tokens, d, 3 * inner), ("attn", "proj"): (b * tokens, inner, d),
                ("attn2", "qkv"): (b * tokens, d, 3 * inner), ("attn2", "proj"): (b * tokens, inner, d),
                ("mlp", "fc1"): (b * mlp_tokens, d, units), ("mlp", "fc2"): (b * mlp_tokens, units, d),
            }[(part, layer)]
        return sizes

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        d = a.hidden_size
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        streams = {}
        for stream in STREAMS:
            part = getattr(module, stream)
            if part.pre_only:
                continue
            modulation = Recorded(part.adaLN_modulation)

            def gate(chunk: int, m: Recorded = modulation) -> torch.Tensor:  # the host's modulation chunk order
                return m.output[:, chunk * d: (chunk + 1) * d].unsqueeze(1)

            heads = [("heads", 0, a.head_dim)]
            overrides: dict[str, Any] = {
                "adaLN_modulation": modulation,
                "attn": ModuleView(part.attn, proj=meter.output_linear(part.attn.proj, heads, lambda g=gate: g(2))),
                "mlp": TokenSubsetMLP(part.mlp.fc1, part.mlp.act, meter.output_linear(
                    part.mlp.fc2, [("groups", 0, a.mlp_hidden // mlp_group_count)], lambda g=gate: g(5)), None),
            }
            if part.x_block_self_attn:
                overrides["attn2"] = ModuleView(part.attn2, proj=meter.output_linear(part.attn2.proj, heads, lambda g=gate: g(8)))
            streams[stream] = ModuleView(part, **overrides)
        txt, img = type(module).forward(ModuleView(module, **streams), args["txt"], args["img"], c=args["vec"],
                                        transformer_options=args.get("transformer_options", {}))
        return {"txt": txt, "img": img}, meter.mean("heads"), meter.mean("groups")
