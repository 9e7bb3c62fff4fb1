"""Adapter for the Flux.1 family (dev, schnell, Fill, Kontext, Redux-conditioned) as ComfyUI builds it.

Flux.1 layout, as the blocks receive it:
- double-stream blocks: separate `img` (B, N, D) and `txt` (B, T, D) streams, each with its own
  modulation, qkv (3*H*hd rows), QK-norm, output projection and GELU MLP (D -> M -> D); attention
  runs jointly over the sequence [txt, img], so head h of the image stream and head h of the text
  stream attend together.
- single-stream blocks: one joint sequence `img` = [txt, img] (B, T+N, D); `linear1` produces
  [q | k | v | mlp_in] (3*H*hd + M rows), `linear2` consumes [attention | gelu(mlp)] (H*hd + M
  columns) and returns D.
- `pe` (RoPE) has shape (B, 1, T+N, hd/2, 2, 2), text first; `attn_mask`, when present, covers the
  joint sequence in the same order.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..flops import FlopBreakdown, attention_flops, linear_flops
from ..slicing import ModuleView, RunIndexCache, WeightSource, gather_sequence, gather_square_mask, gather_tokens
from .flux_blocks import ReducedFluxBlock, Recorded, TokenSubsetMLP, UnitMeter, call_forward, text_positions
from .base import BlockInternals, BlockRef, BlockWork, CallShape, ModelAdapter, TokenLayout, UnsupportedModelError
from .flux_coarse import FluxCoarseGrid

DOUBLE = "double"
SINGLE = "single"


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


def _class_path(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _linear_shape(layer: torch.nn.Module, name: str) -> tuple[int, int]:
    weight = getattr(layer, "weight", None)
    if weight is None or weight.ndim != 2:
        raise UnsupportedModelError(f"Flux adapter: expected a Linear layer at '{name}', found {type(layer).__name__}.")
    out_features, in_features = weight.shape
    return int(out_features), int(in_features)


class FluxAdapter(ModelAdapter):
    family = "flux"
    display_name = "Flux.1"
    supported_variants = ("Flux.1 dev", "Flux.1 schnell", "Flux.1 Fill", "Flux.1 Kontext")

    # Model classes of the Flux family tree that this adapter recognises but does not support yet.
    _REFUSED_CLASSES = {
        "Chroma": "Chroma (Flux-derived, with a distilled modulation network instead of per-block modulation)",
        "ChromaRadiance": "Chroma Radiance (pixel-space Chroma)",
    }

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module) -> bool:
        module = type(diffusion_model).__module__
        return module.startswith("comfy.ldm.flux") or module.startswith("comfy.ldm.chroma")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        name = type(diffusion_model).__name__
        if name in self._REFUSED_CLASSES:
            self._refuse(self._REFUSED_CLASSES[name])
        if _class_path(diffusion_model) != "comfy.ldm.flux.model.Flux":
            self._refuse(f"an unknown Flux relative ({_class_path(diffusion_model)})")
        params = getattr(diffusion_model, "params", None)
        if params is None:
            self._refuse("a Flux model without FluxParams")
        if host_model_name == "Flux2" or getattr(params, "global_modulation", False) or len(params.axes_dim) != 3:
            self._refuse("Flux 2 (shared global modulation, SwiGLU MLPs, 4-axis RoPE)")
        if getattr(params, "mlp_silu_act", False):
            self._refuse("a Flux variant with SwiGLU MLPs")
        if host_model_name is not None and host_model_name not in ("Flux", "FluxInpaint"):
            self._refuse(f"the Flux-based '{host_model_name}' model type")
        self.arch = self._describe(diffusion_model, params)
        self._blocks = tuple(
            [BlockRef(DOUBLE, i) for i in range(self.arch.depth_double)]
            + [BlockRef(SINGLE, i) for i in range(self.arch.depth_single)]
        )

    def _refuse(self, what: str) -> None:
        raise UnsupportedModelError(
            f"Dynamic DiT does not support {what} yet; it would not patch it blindly. "
            f"Supported: {', '.join(self.supported_variants)}."
        )

    def _describe(self, model: torch.nn.Module, params: Any) -> FluxArchitecture:
        hidden, heads = int(params.hidden_size), int(params.num_heads)
        if hidden % heads:
            self._refuse(f"a Flux model whose hidden size {hidden} is not a multiple of its {heads} heads")
        double_blocks = list(getattr(model, "double_blocks", []))
        single_blocks = list(getattr(model, "single_blocks", []))
        mlp_hidden = None
        for i, block in enumerate(double_blocks):
            where = f"double_blocks.{i}"
            if type(block).__name__ != "DoubleStreamBlock" or getattr(block, "flipped_img_txt", False):
                self._refuse(f"a Flux model with an unexpected double block at {where}")
            if not getattr(block, "modulation", True):
                self._refuse("Flux 2 (double blocks without their own modulation)")
            for stream in ("img", "txt"):
                qkv_out, _ = _linear_shape(getattr(block, f"{stream}_attn").qkv, f"{where}.{stream}_attn.qkv")
                mlp = getattr(block, f"{stream}_mlp")
                if len(mlp) != 3 or type(mlp[1]).__name__ != "GELU":
                    self._refuse(f"a Flux model with a non-GELU MLP at {where}.{stream}_mlp")
                m_out, _ = _linear_shape(mlp[0], f"{where}.{stream}_mlp.0")
                if qkv_out != 3 * hidden or (mlp_hidden is not None and m_out != mlp_hidden):
                    self._refuse(f"a Flux model with inconsistent layer widths at {where}")
                mlp_hidden = m_out
        for i, block in enumerate(single_blocks):
            where = f"single_blocks.{i}"
            if type(block).__name__ != "SingleStreamBlock" or getattr(block, "modulation", None) is None:
                self._refuse(f"a Flux model with an unexpected single block at {where}")
            m = int(block.mlp_hidden_dim)
            l1_out, _ = _linear_shape(block.linear1, f"{where}.linear1")
            if l1_out != 3 * hidden + m or (mlp_hidden is not None and m != mlp_hidden):
                self._refuse(f"a Flux model with inconsistent layer widths at {where}")
            mlp_hidden = m
        if mlp_hidden is None:
            self._refuse("a Flux model without blocks")
        _, img_in = _linear_shape(model.img_in, "img_in")
        _, context_dim = _linear_shape(model.txt_in, "txt_in")
        final_out, _ = _linear_shape(model.final_layer.linear, "final_layer.linear")
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
            vec_dim=_linear_shape(vector_in.in_layer, "vector_in.in_layer")[1] if vector_in is not None else None,
            guidance_embed=bool(params.guidance_embed),
            axes_dim=tuple(int(a) for a in params.axes_dim),
        )

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def patch_key(self, block: BlockRef) -> tuple[str, int]:
        return (f"{block.kind}_block", block.index)

    def block_module(self, diffusion_model: torch.nn.Module, block: BlockRef) -> torch.nn.Module:
        blocks = diffusion_model.double_blocks if block.kind == DOUBLE else diffusion_model.single_blocks
        return blocks[block.index]

    def token_layout(self, block: BlockRef) -> TokenLayout:
        return TokenLayout(text_first=True, pe_sequence_dim=2)

    def block_tokens(self, block: BlockRef, args: Mapping[str, Any], text_tokens: int) -> BlockWork:
        img = args["img"]
        if block.kind == DOUBLE:
            return BlockWork(batch=img.shape[0], image_tokens=img.shape[1], text_tokens=args["txt"].shape[1])
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1] - text_tokens, text_tokens=text_tokens)

    def linear_layers(self, module: torch.nn.Module, block: BlockRef) -> dict[str, torch.nn.Module]:
        if block.kind == DOUBLE:
            layers = {}
            for stream in ("img", "txt"):
                attn, mlp = getattr(module, f"{stream}_attn"), getattr(module, f"{stream}_mlp")
                layers[f"{stream}_mod.lin"] = getattr(module, f"{stream}_mod").lin
                layers[f"{stream}_attn.qkv"] = attn.qkv
                layers[f"{stream}_attn.proj"] = attn.proj
                layers[f"{stream}_mlp.0"] = mlp[0]
                layers[f"{stream}_mlp.2"] = mlp[2]
            return layers
        return {"modulation.lin": module.modulation.lin, "linear1": module.linear1, "linear2": module.linear2}

    def reduced_work(self, block: BlockRef, work: BlockWork, internals: BlockInternals) -> BlockWork:
        changes: dict[str, Any] = {}
        if internals.heads is not None:
            changes["heads"] = len(internals.heads)
        if internals.mlp_groups is not None:
            changes["mlp_hidden"] = len(internals.mlp_groups) * (self.arch.mlp_hidden // internals.mlp_group_count)
        if internals.mlp_tokens is not None:
            changes["mlp_image_tokens"] = internals.mlp_tokens.shape[1]
        return replace(work, **changes)

    def run_block(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        internals: BlockInternals,
        flop_log: list[float],
        text_tokens: int,
        cache: RunIndexCache,
    ) -> dict:
        reduced = ReducedFluxBlock(self.arch, module, internals, flop_log, cache)
        if block.kind == DOUBLE:
            img, txt = call_forward(type(module), reduced.double_view(), args)
            return {"img": img, "txt": txt}
        return {"img": call_forward(type(module), reduced.single_view(text_tokens), args)}

    # --- token routing ------------------------------------------------------------------------
    @property
    def routes_tokens(self) -> bool:
        return True

    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], text_tokens: int) -> torch.Tensor:
        img = stream["img"]
        return img if block.kind == DOUBLE else img[:, text_tokens:]

    def select_image_tokens(
        self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, text_tokens: int
    ) -> dict:
        text = torch.arange(text_tokens, device=index.device).expand(index.shape[0], -1)
        joint = torch.cat((text, index + text_tokens), dim=1)  # positions in the [text, image] sequence
        reduced = dict(args)
        # The double block's txt stream is passed as is: the block updates it in place, as the host's would.
        reduced["img"] = gather_tokens(args["img"], index if block.kind == DOUBLE else joint)
        if args.get("pe") is not None:
            reduced["pe"] = gather_sequence(args["pe"], joint, dim=2)
        if args.get("attn_mask") is not None:
            reduced["attn_mask"] = gather_square_mask(args["attn_mask"], joint)
        return reduced

    def merge_image_tokens(
        self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor, text_tokens: int
    ) -> dict:
        img, out = args["img"], reduced_out["img"]
        if block.kind == DOUBLE:
            img.scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), out)
        else:
            img[:, :text_tokens] = out[:, :text_tokens]
            img[:, text_tokens:].scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), out[:, text_tokens:])
        return {**reduced_out, "img": img}

    # --- width: unit counts, calibration inputs, timestep features ----------------------------
    @property
    def head_count(self) -> int:
        return self.arch.num_heads

    @property
    def mlp_hidden(self) -> int:
        return self.arch.mlp_hidden

    @property
    def output_channels(self) -> int:
        return self.arch.out_channels

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
            for stream in ("img", "txt"):
                attn, mlp = getattr(module, f"{stream}_attn"), getattr(module, f"{stream}_mlp")
                modulation = overrides[f"{stream}_mod"] = Recorded(getattr(module, f"{stream}_mod"))
                proj = meter.output_linear(attn.proj, [("heads", 0, a.head_dim)], lambda m=modulation: m.output[0].gate)
                mlp_out = meter.output_linear(mlp[2], [("groups", 0, group_size)], lambda m=modulation: m.output[1].gate)
                overrides[f"{stream}_attn"] = ModuleView(attn, proj=proj)
                overrides[f"{stream}_mlp"] = TokenSubsetMLP(mlp[0], mlp[1], mlp_out, None)
            img, txt = call_forward(type(module), ModuleView(module, **overrides), args)
            out = {"img": img, "txt": txt}
        else:
            modulation = Recorded(module.modulation)
            linear2 = meter.output_linear(
                module.linear2,
                [("heads", 0, a.head_dim), ("groups", a.hidden_size, group_size)],
                lambda: modulation.output[0].gate,
            )
            out = {"img": call_forward(type(module), ModuleView(module, modulation=modulation, linear2=linear2), args)}
        return out, meter.mean("heads"), meter.mean("groups")

    # --- calls --------------------------------------------------------------------------------
    def image_tokens_of(self, latent: torch.Tensor) -> int:
        p = self.arch.patch_size
        return math.ceil(latent.shape[-2] / p) * math.ceil(latent.shape[-1] / p)

    def call_shape(self, arguments: Mapping[str, Any]) -> CallShape:
        x = arguments["x"]
        image = self.image_tokens_of(x)
        for ref in arguments.get("ref_latents") or ():
            image += self.image_tokens_of(ref)
        guidance = self.arch.guidance_embed and arguments.get("guidance") is not None
        return CallShape(batch=x.shape[0], image_tokens=image, text_tokens=arguments["context"].shape[1], guidance=guidance)

    def coarse_grid(self) -> FluxCoarseGrid:
        return FluxCoarseGrid(self.arch, self._blocks, self.family)

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, shape: CallShape) -> FlopBreakdown:
        a, b = self.arch, shape.batch
        d = a.hidden_size
        embed = linear_flops(b * shape.image_tokens, a.latent_channels * a.patch_size**2, d)
        embed += linear_flops(b * shape.text_tokens, a.context_dim, d)
        embedders = 1 + int(shape.guidance)  # time_in (+ guidance_in): 256 -> D -> D
        embed += embedders * (linear_flops(b, 256, d) + linear_flops(b, d, d))
        if a.vec_dim is not None:
            embed += linear_flops(b, a.vec_dim, d) + linear_flops(b, d, d)
        final = linear_flops(b, d, 2 * d) + linear_flops(b * shape.image_tokens, d, a.out_channels * a.patch_size**2)
        return FlopBreakdown(embed=embed, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = a.num_heads if work.heads is None else work.heads
        mlp = a.mlp_hidden if work.mlp_hidden is None else work.mlp_hidden
        n, t = work.image_tokens, work.text_tokens
        n_mlp = n if work.mlp_image_tokens is None else work.mlp_image_tokens
        inner = heads * hd
        attention = attention_flops(b, heads, n + t, n + t, hd)
        if block.kind == DOUBLE:
            return FlopBreakdown(
                modulation=2 * linear_flops(b, d, 6 * d),
                qkv=linear_flops(b * (n + t), d, 3 * inner),
                attention=attention,
                proj=linear_flops(b * (n + t), inner, d),
                mlp=linear_flops(b * (n_mlp + t), d, mlp) + linear_flops(b * (n_mlp + t), mlp, d),
                extra=work.extra_flops,
            )
        return FlopBreakdown(
            modulation=linear_flops(b, d, 3 * d),
            qkv=linear_flops(b * (n + t), d, 3 * inner),
            attention=attention,
            proj=linear_flops(b * (n + t), inner, d),
            mlp=linear_flops(b * (n_mlp + t), d, mlp) + linear_flops(b * (n_mlp + t), mlp, d),
            extra=work.extra_flops,
        )
