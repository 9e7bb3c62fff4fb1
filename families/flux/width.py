"""Width units of Flux.1: attention heads and MLP channel groups, the calibration inputs, the timestep
features a width router reads, and the measurement of each unit's share of a block's output."""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..capabilities import WidthUnits
from ..block_views import Recorded, TokenSubsetMLP, UnitMeter
from .blocks import call_forward

if TYPE_CHECKING:
    from .adapter import FluxArchitecture

DOUBLE = "double"


class FluxWidthUnits(WidthUnits):
    def __init__(self, arch: "FluxArchitecture") -> None:
        self.arch = arch
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.out_channels, height, width, generator=generator)

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        a, batch = self.arch, latent.shape[0]
        x = latent
        if a.latent_channels > latent.shape[1]:  # Fill: the masked-image and mask channels stay empty
            x = torch.cat((latent, latent.new_zeros(batch, a.latent_channels - latent.shape[1], *latent.shape[2:])), dim=1)
        arguments: dict[str, Any] = {"x": x, "timestep": timestep, "context": latent.new_zeros(batch, text_tokens, a.context_dim)}
        if a.vec_dim is not None:
            arguments["y"] = latent.new_zeros(batch, a.vec_dim)
        if a.guidance_embed:
            arguments["guidance"] = torch.full((batch,), float(guidance), device=latent.device, dtype=torch.float32)
        return arguments

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # vec = time_in(timestep_embedding(t, 256)) before guidance and pooled text are added to it;
        # the embedding function is the one the host's Flux module itself calls.
        embedding = inspect.getmodule(type(diffusion_model)).timestep_embedding
        return diffusion_model.time_in(embedding(timestep, 256).to(dtype))

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        d, m = self.arch.hidden_size, self.arch.mlp_hidden
        if block.kind == DOUBLE:  # per stream: the output projection reads the heads, mlp.2 the MLP units
            return {f"{stream}_{name}": ((kind, 0, width),) for stream in ("img", "txt")
                    for name, kind, width in (("attn.proj", "heads", d), ("mlp.2", "groups", m))}
        return {"linear2": (("heads", 0, d), ("groups", d, m))}  # linear2 reads [attention | gelu(mlp)]

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.mlp_hidden)
        n, t = work.image_tokens, work.text_tokens
        n_mlp = work.mlp_tokens
        first = 2 * units if a.gated_mlp else units  # SwiGLU's first linear gives gate and up
        if block.kind == DOUBLE:
            sizes = {}
            for stream, tokens, mlp_tokens in (("img", n, n_mlp), ("txt", t, t)):
                if not a.shared_modulation:
                    sizes[f"{stream}_mod.lin"] = (b, d, 6 * d)
                sizes.update({
                    f"{stream}_attn.qkv": (b * tokens, d, 3 * inner), f"{stream}_attn.proj": (b * tokens, inner, d),
                    f"{stream}_mlp.0": (b * mlp_tokens, d, first), f"{stream}_mlp.2": (b * mlp_tokens, units, d),
                })
            return sizes
        rows = b * (n + t)
        sizes = {} if a.shared_modulation else {"modulation.lin": (b, d, 3 * d)}
        return {**sizes, "linear1": (rows, d, 3 * inner + first), "linear2": (rows, inner + units, d)}

    def measure_units(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        mlp_group_count: int,
        weights: WeightSource,
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        group_size = a.mlp_hidden // mlp_group_count
        if block.kind == DOUBLE:
            overrides: dict[str, Any] = {}
            for index, stream in enumerate(("img", "txt")):
                attn, mlp = getattr(module, f"{stream}_attn"), getattr(module, f"{stream}_mlp")
                if a.shared_modulation:  # Flux 2: the block receives its streams' modulations as `vec`
                    modulation = _Given(args["vec"][index])
                else:
                    modulation = overrides[f"{stream}_mod"] = Recorded(getattr(module, f"{stream}_mod"))
                proj = meter.output_linear(attn.proj, [("heads", 0, a.head_dim)], lambda m=modulation: m.output[0].gate)
                mlp_out = meter.output_linear(mlp[2], [("groups", 0, group_size)], lambda m=modulation: m.output[1].gate)
                overrides[f"{stream}_attn"] = ModuleView(attn, proj=proj)
                overrides[f"{stream}_mlp"] = TokenSubsetMLP(mlp[0], mlp[1], mlp_out, None)
            img, txt = call_forward(type(module), ModuleView(module, **overrides), args)
            out = {"img": img, "txt": txt}
        else:
            shared = a.shared_modulation
            modulation = _Given((args["vec"], None)) if shared else Recorded(module.modulation)
            linear2 = meter.output_linear(
                module.linear2,
                [("heads", 0, a.head_dim), ("groups", a.hidden_size, group_size)],
                lambda: modulation.output[0].gate,
            )
            view = ModuleView(module, linear2=linear2) if shared else ModuleView(module, modulation=modulation, linear2=linear2)
            out = {"img": call_forward(type(module), view, args)}
        return out, meter.mean("heads"), meter.mean("groups")


class _Given:
    """A modulation the block receives (Flux 2), read like a `Recorded` one's output."""

    def __init__(self, output: Any) -> None:
        self.output = output
