"""Width units of Qwen-Image: attention heads (shared by the image and text streams, which attend jointly) and MLP
channel groups of both streams, the calibration inputs, the timestep features a width router reads, and the
measurement of each unit's share of a block's output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ...core.slicing import ModuleView, WeightSource
from ..base import BlockRef, BlockWork
from ..block_views import Recorded, TokenSubsetMLP, UnitMeter
from ..capabilities import CallLayout, WidthUnits
from .blocks import STREAM_LINEARS, call_block, mlp_parts

if TYPE_CHECKING:
    from .adapter import QwenImageArchitecture


class QwenWidthUnits(WidthUnits):
    def __init__(self, arch: "QwenImageArchitecture") -> None:
        self.arch = arch
        self.head_count = arch.num_heads
        self.mlp_hidden = arch.mlp_hidden

    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(1, self.arch.out_channels, 1, height, width, generator=generator)  # Wan 2.1's latent: one frame

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        return {"x": latent, "timestep": timestep, "context": latent.new_zeros(latent.shape[0], text_tokens, self.arch.context_dim)}

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # temb = time_text_embed(timestep): the host's own module (it reads only the dtype of its second argument)
        return diffusion_model.time_text_embed(timestep, torch.empty(0, dtype=dtype, device=timestep.device))

    def unit_columns(self, block: BlockRef) -> dict[str, tuple[tuple[str, int, int], ...]]:
        a = self.arch
        return {names[i]: ((kind, 0, width),) for names in STREAM_LINEARS.values()
                for i, kind, width in ((4, "heads", a.hidden_size), (6, "groups", a.mlp_hidden))}

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d = a.hidden_size
        inner = work.kept_heads(a.num_heads) * a.head_dim
        units = work.kept_mlp(a.mlp_hidden)
        n_mlp = work.mlp_tokens
        sizes = {}
        for stream, tokens, mlp_tokens in (("img", work.image_tokens, n_mlp), ("txt", work.text_tokens, work.text_tokens)):
            mod, q, k, v, out, first, last = STREAM_LINEARS[stream]
            sizes.update({mod: (b, d, 6 * d), q: (b * tokens, d, inner), k: (b * tokens, d, inner), v: (b * tokens, d, inner),
                          out: (b * tokens, inner, d), first: (b * mlp_tokens, d, units), last: (b * mlp_tokens, units, d)})
        return sizes

    def measure_units(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], mlp_group_count: int,
                      weights: WeightSource) -> tuple[dict, torch.Tensor, torch.Tensor]:
        a = self.arch
        d = a.hidden_size
        meter = UnitMeter(a.num_heads, mlp_group_count, weights)
        overrides: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for stream, names in STREAM_LINEARS.items():
            modulation = overrides[f"{stream}_mod"] = Recorded(getattr(module, f"{stream}_mod"))

            def gate(which: int, m: Recorded = modulation) -> torch.Tensor:  # [shift, scale, gate] x 2 of the stream
                return m.output[..., (3 * which + 2) * d: (3 * which + 3) * d].unsqueeze(1)

            outputs[names[4]] = meter.output_linear(module.get_submodule(names[4]), [("heads", 0, a.head_dim)], lambda g=gate: g(0))
            first, act, last = mlp_parts(getattr(module, f"{stream}_mlp"))
            overrides[f"{stream}_mlp"] = TokenSubsetMLP(
                first, act, meter.output_linear(last, [("groups", 0, a.mlp_hidden // mlp_group_count)], lambda g=gate: g(1)), None)
        attn = module.attn
        overrides["attn"] = ModuleView(attn, to_out=[outputs["attn.to_out.0"], attn.to_out[1]], to_add_out=outputs["attn.to_add_out"])
        layout = CallLayout(batch=args["img"].shape[0], image_tokens=args["img"].shape[1], text_tokens=args["txt"].shape[1])
        txt, img = call_block(type(module), ModuleView(module, **overrides), args, layout)
        return {"txt": txt, "img": img}, meter.mean("heads"), meter.mean("groups")
