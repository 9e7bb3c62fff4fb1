"""Adapter for the Flux.1 family (dev, schnell, Fill, Kontext, Redux-conditioned) and Flux 2 (dev, Klein) as
ComfyUI builds them.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping

import torch

from ...core.fingerprint import sample_parameters
from ...core.flops import FlopBreakdown, attention_flops, linear_flops
from ...core.slicing import RunIndexCache
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, class_path
from ..capabilities import CallLayout, ModelInfo
from .blocks import ReducedFluxBlock, WidthSelections, call_forward
from .coarse import Flux2CoarseGrid, FluxCoarseGrid
from .routing import FluxTokenRouting
from .width import FluxWidthUnits

DOUBLE = "double"
SINGLE = "single"

_STREAM_LINEARS = ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")
# Flux.1's blocks as data: ComfyUI's patch keys, where the blocks live, the linears TD-LoRA can adapt.
FLUX_BLOCK_KINDS = (
    BlockKind(DOUBLE, "double_block", "double_blocks",
              tuple(f"{stream}_{name}" for stream in ("img", "txt") for name in _STREAM_LINEARS)),
    BlockKind(SINGLE, "single_block", "single_blocks", ("modulation.lin", "linear1", "linear2")),
)
# Flux 2: the blocks have no modulation layers of their own (the model modulates once for all of them).
FLUX2_BLOCK_KINDS = (
    BlockKind(DOUBLE, "double_block", "double_blocks",
              tuple(f"{stream}_{name}" for stream in ("img", "txt") for name in _STREAM_LINEARS if name != "mod.lin")),
    BlockKind(SINGLE, "single_block", "single_blocks", ("linear1", "linear2")),
)


@dataclass(frozen=True)
class FluxArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth_double: int
    depth_single: int
    patch_size: int
    latent_channels: int  # channels of the latent entering img_in (incl. Fill/Kontext concat)
    out_channels: int
    context_dim: int
    vec_dim: int | None
    guidance_embed: bool
    axes_dim: tuple[int, ...]
    shared_modulation: bool = False  # Flux 2: one modulation per stream for all blocks, computed before them
    gated_mlp: bool = False  # Flux 2: SwiGLU, the first MLP linear gives [gate | up] (2 x mlp_hidden rows)


class FluxAdapter(ModelAdapter):
    family = "flux"
    display_name = "Flux.1"
    supported_variants = ("Flux.1 dev", "Flux.1 schnell", "Flux.1 Fill", "Flux.1 Kontext", "Flux 2 dev", "Flux 2 Klein")
    block_kinds = FLUX_BLOCK_KINDS
    _width_class: type[FluxWidthUnits] = FluxWidthUnits

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.flux")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        params = self._check_variant(diffusion_model, host_model_name)
        self.arch = self._describe(diffusion_model, params)
        self._blocks = tuple(
            [BlockRef(DOUBLE, i) for i in range(self.arch.depth_double)]
            + [BlockRef(SINGLE, i) for i in range(self.arch.depth_single)]
        )
        a = self.arch
        self._info = ModelInfo(
            family=self.family,
            display_name=self.display_name,
            hidden_size=a.hidden_size,
            num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden,
            depths=((DOUBLE, a.depth_double), (SINGLE, a.depth_single)),
            fields={"patch_size": str(a.patch_size), "in_channels": str(a.latent_channels), "out_channels": str(a.out_channels)},
            timestep_scale=1000.0,  # Flux embeds t = 1000 * sigma (timestep_embedding's time_factor)
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("img_in.weight", "txt_in.weight", "final_layer.linear.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = FluxTokenRouting(a)
        self._width = self._width_class(a)

    def _check_variant(self, diffusion_model: torch.nn.Module, host_model_name: str | None) -> Any:
        """The model's parameters, once it is known to be a variant this adapter runs (else refused by name);
        sets the family, display name and block kinds of that variant."""
        if class_path(diffusion_model) != "comfy.ldm.flux.model.Flux":
            self._refuse(f"an unknown Flux relative ({class_path(diffusion_model)})")
        params = getattr(diffusion_model, "params", None)
        if params is None:
            self._refuse("a Flux model without FluxParams")
        flux2 = host_model_name == "Flux2" or bool(getattr(params, "global_modulation", False))
        if flux2:  # the same block classes with Flux 2's switches: shared modulation, SwiGLU, no biases, 4-axis RoPE
            self.family, self.display_name = "flux2", "Flux 2"
            self.block_kinds = FLUX2_BLOCK_KINDS
            if not (getattr(params, "global_modulation", False) and getattr(params, "mlp_silu_act", False)):
                self._refuse("a Flux 2 variant without its shared modulation and SwiGLU MLPs")
        elif getattr(params, "mlp_silu_act", False) or getattr(params, "yak_mlp", False):
            self._refuse("a Flux.1 variant with gated MLPs")
        if host_model_name is not None and host_model_name not in ("Flux", "FluxInpaint", "Flux2"):
            self._refuse(f"the Flux-based '{host_model_name}' model type")
        return params

    def _modulation_is_shared(self, params: Any) -> bool:
        """Whether the model modulates once per call and hands each block its modulation (Flux 2)."""
        return bool(getattr(params, "global_modulation", False))

    def _describe(self, model: torch.nn.Module, params: Any) -> FluxArchitecture:
        hidden, heads = int(params.hidden_size), int(params.num_heads)
        if hidden % heads:
            self._refuse(f"a Flux model whose hidden size {hidden} is not a multiple of its {heads} heads")
        double_blocks = list(getattr(model, "double_blocks", []))
        single_blocks = list(getattr(model, "single_blocks", []))
        shared = self._modulation_is_shared(params)
        gated = bool(getattr(params, "mlp_silu_act", False))
        activation, first_rows = ("SiLUActivation", 2) if gated else ("GELU", 1)
        mlp_hidden = None
        for i, block in enumerate(double_blocks):
            where = f"double_blocks.{i}"
            if type(block).__name__ != "DoubleStreamBlock" or getattr(block, "flipped_img_txt", False):
                self._refuse(f"a Flux model with an unexpected double block at {where}")
            if bool(getattr(block, "modulation", True)) == shared:
                self._refuse(f"a Flux model whose double block at {where} has {'its own' if shared else 'no'} modulation")
            for stream in ("img", "txt"):
                qkv_out, _ = self._shape(getattr(block, f"{stream}_attn").qkv, f"{where}.{stream}_attn.qkv")
                mlp = getattr(block, f"{stream}_mlp")
                if len(mlp) != 3 or type(mlp[1]).__name__ != activation:
                    self._refuse(f"a Flux model with an unexpected MLP at {where}.{stream}_mlp")
                m_out, _ = self._shape(mlp[0], f"{where}.{stream}_mlp.0")
                m = m_out // first_rows
                if qkv_out != 3 * hidden or (mlp_hidden is not None and m != mlp_hidden):
                    self._refuse(f"a Flux model with inconsistent layer widths at {where}")
                mlp_hidden = m
        for i, block in enumerate(single_blocks):
            where = f"single_blocks.{i}"
            if type(block).__name__ != "SingleStreamBlock" or (getattr(block, "modulation", None) is None) != shared:
                self._refuse(f"a Flux model with an unexpected single block at {where}")
            m = int(block.mlp_hidden_dim)
            l1_out, _ = self._shape(block.linear1, f"{where}.linear1")
            if l1_out != 3 * hidden + first_rows * m or (mlp_hidden is not None and m != mlp_hidden):
                self._refuse(f"a Flux model with inconsistent layer widths at {where}")
            mlp_hidden = m
        if mlp_hidden is None:
            self._refuse("a Flux model without blocks")
        _, img_in = self._shape(model.img_in, "img_in")
        _, context_dim = self._shape(model.txt_in, "txt_in")
        final_out, _ = self._shape(model.final_layer.linear, "final_layer.linear")
        patch = int(model.patch_size)
        vector_in = getattr(model, "vector_in", None)
        return FluxArchitecture(
            hidden_size=hidden,
            num_heads=heads,
            head_dim=hidden // heads,
            mlp_hidden=mlp_hidden,
            depth_double=len(double_blocks),
            depth_single=len(single_blocks),
            patch_size=patch,
            latent_channels=img_in // (patch * patch),
            out_channels=final_out // (patch * patch),
            context_dim=context_dim,
            vec_dim=self._shape(vector_in.in_layer, "vector_in.in_layer")[1] if vector_in is not None else None,
            guidance_embed=bool(getattr(params, "guidance_embed", False)),
            axes_dim=tuple(int(a) for a in params.axes_dim),
            shared_modulation=shared,
            gated_mlp=gated,
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def image_tokens_of(self, latent: torch.Tensor) -> int:
        p = self.arch.patch_size
        return math.ceil(latent.shape[-2] / p) * math.ceil(latent.shape[-1] / p)

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x = arguments["x"]
        image = self.image_tokens_of(x)
        for ref in arguments.get("ref_latents") or ():
            image += self.image_tokens_of(ref)
        guidance = self.arch.guidance_embed and arguments.get("guidance") is not None
        return CallLayout(batch=x.shape[0], image_tokens=image, text_tokens=arguments["context"].shape[1], guidance=guidance)

    def block_layout(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> CallLayout:
        # A double block's own text stream gives the text length the single blocks' joint sequence starts with.
        if block.kind == DOUBLE and args["txt"].shape[1] != layout.text_tokens:
            return replace(layout, text_tokens=args["txt"].shape[1])
        return layout

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        img = args["img"]
        if block.kind == DOUBLE:
            return BlockWork(batch=img.shape[0], image_tokens=img.shape[1], text_tokens=args["txt"].shape[1])
        text = layout.text_tokens
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1] - text, text_tokens=text)

    def run_block(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        internals: BlockInternals,
        flop_log: list[float],
        layout: CallLayout,
        cache: RunIndexCache,
    ) -> dict:
        reduced = ReducedFluxBlock(self.arch, module, internals, flop_log, cache, args["img"].device)
        if block.kind == DOUBLE:
            img, txt = call_forward(type(module), reduced.double_view(), args)
            return {"img": img, "txt": txt}
        return {"img": call_forward(type(module), reduced.single_view(layout.text_tokens), args)}

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        """Build the weight selections of many width decisions ahead (e.g. every step of a run), with all
        their gather indices in one host-to-device copy."""
        WidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> FluxTokenRouting:
        return self._routing

    def width_units(self) -> FluxWidthUnits:
        return self._width

    def coarse_grid(self) -> FluxCoarseGrid:
        grid = Flux2CoarseGrid if self.arch.shared_modulation else FluxCoarseGrid  # Flux 2: training-free only
        return grid(self.arch, self._blocks, self._info)

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, shape: CallLayout) -> FlopBreakdown:
        a, b = self.arch, shape.batch
        d = a.hidden_size
        embed = linear_flops(b * shape.image_tokens, a.latent_channels * a.patch_size**2, d)
        embed += linear_flops(b * shape.text_tokens, a.context_dim, d)
        embedders = 1 + int(shape.guidance)  # time_in (+ guidance_in): 256 -> D -> D
        embed += embedders * (linear_flops(b, 256, d) + linear_flops(b, d, d))
        if a.vec_dim is not None:
            embed += linear_flops(b, a.vec_dim, d) + linear_flops(b, d, d)
        if a.shared_modulation:  # Flux 2 modulates once per call: both streams of the double blocks, the single blocks
            embed += 2 * linear_flops(b, d, 6 * d) + linear_flops(b, d, 3 * d)
        final = linear_flops(b, d, 2 * d) + linear_flops(b * shape.image_tokens, d, a.out_channels * a.patch_size**2)
        return FlopBreakdown(embed=embed, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        mlp = work.kept_mlp(a.mlp_hidden)
        n, t = work.image_tokens, work.text_tokens
        n_mlp = work.mlp_tokens
        inner = heads * hd
        first = 2 * mlp if a.gated_mlp else mlp  # SwiGLU's first linear gives gate and up
        shared = a.shared_modulation
        return FlopBreakdown(
            modulation=0.0 if shared else linear_flops(b, d, 12 * d if block.kind == DOUBLE else 3 * d),
            qkv=linear_flops(b * (n + t), d, 3 * inner),
            attention=attention_flops(b, heads, n + t, n + t, hd),
            proj=linear_flops(b * (n + t), inner, d),
            mlp=linear_flops(b * (n_mlp + t), d, first) + linear_flops(b * (n_mlp + t), mlp, d),
            extra=work.extra_flops,
        )
