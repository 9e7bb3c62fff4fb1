"""Adapter for Z-Image (Turbo and base) as ComfyUI builds it: `NextDiT` with Z-Image's modulation (comfy/ldm/lumina,
host model `Lumina2`, 0.3.75 and 0.12.1).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch

from ...core.fingerprint import sample_parameters
from ...core.flops import FlopBreakdown, attention_flops, linear_flops
from ...core.slicing import RunIndexCache
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, UnsupportedModelError, class_path
from ..capabilities import CallLayout, ModelInfo
from .blocks import LINEARS, ReducedZImageBlock, ZImageWidthSelections
from .coarse import ZImageCoarseGrid
from .routing import ZImageTokenRouting, joint_rows
from .width import ZImageWidthUnits

LAYER = "layer"
_ARGUMENTS = ("img", "mask", "pe", "vec")  # the block forward's positional parameters, as a replace patch names them


@dataclass(frozen=True)
class ZImageArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    refiner_depth: int  # blocks in each of the context and noise refiners
    patch_size: int
    in_channels: int
    context_dim: int  # the caption encoder's width (cap_feat_dim)
    modulation_dim: int  # the adaLN input's width (256)
    timestep_hidden: int  # the timestep embedder's hidden width (min(D, 1024))
    timestep_frequencies: int  # its sinusoidal input's width (256)
    pad_multiple: int  # pad_tokens_multiple (1: no padding)


def _padded(count: int, multiple: int) -> int:
    return count + (-count) % multiple


class ZImageAdapter(ModelAdapter):
    family = "z_image"
    display_name = "Z-Image"
    supported_variants = ("Z-Image Turbo", "Z-Image (base)")
    block_kinds = (BlockKind(LAYER, "z_image_layer", "layers", LINEARS, emulated=True),)
    timestep_argument = "timesteps"

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.lumina")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if class_path(diffusion_model) != "comfy.ldm.lumina.model.NextDiT":
            self._refuse(f"the Lumina-family model {type(diffusion_model).__name__}")
        layers = list(getattr(diffusion_model, "layers", []))
        if not layers or len(layers[0].adaLN_modulation) != 1:  # Z-Image's modulation is a bare Linear (Lumina 2: SiLU first)
            self._refuse("Lumina 2 (its grouped-query attention and modulation are not Z-Image's)")
        self.arch = a = self._describe(diffusion_model, layers)
        self._blocks = tuple(BlockRef(LAYER, i) for i in range(a.depth))
        self._info = ModelInfo(
            family=self.family, display_name=self.display_name, hidden_size=a.hidden_size, num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden, depths=((LAYER, a.depth),),
            fields={"patch_size": str(a.patch_size), "in_channels": str(a.in_channels)},
            timestep_scale=1000.0,  # a TD-LoRA gate's embedding of sigma (the model itself embeds 1000 * (1 - sigma))
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("x_embedder.weight", "cap_embedder.1.weight", "final_layer.linear.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = ZImageTokenRouting()
        self._width = ZImageWidthUnits(a)
        self._coarse = ZImageCoarseGrid(a, self._blocks, self._info)

    def _describe(self, model: torch.nn.Module, layers: list[torch.nn.Module]) -> ZImageArchitecture:
        attention = layers[0].attention
        heads, head_dim = int(attention.n_local_heads), int(attention.head_dim)
        if int(attention.n_local_kv_heads) != heads:
            self._refuse("a Lumina-family model with grouped-query attention")
        hidden = int(model.dim)
        mlp_hidden = None
        for i, layer in enumerate(layers):
            where = f"layers.{i}"
            if type(layer).__name__ != "JointTransformerBlock" or not layer.modulation:
                self._refuse(f"a Z-Image model with an unexpected block at {where}")
            qkv, _ = self._shape(layer.attention.qkv, f"{where}.attention.qkv")
            m, _ = self._shape(layer.feed_forward.w1, f"{where}.feed_forward.w1")
            if qkv != 3 * heads * head_dim or (mlp_hidden is not None and m != mlp_hidden):
                self._refuse(f"a Z-Image model with inconsistent layer widths at {where}")
            mlp_hidden = m
        patch = int(model.patch_size)
        _, context_dim = self._shape(model.cap_embedder[1], "cap_embedder.1")
        _, modulation_dim = self._shape(layers[0].adaLN_modulation[0], "layers.0.adaLN_modulation.0")
        timestep_hidden, timestep_frequencies = self._shape(model.t_embedder.mlp[0], "t_embedder.mlp.0")
        return ZImageArchitecture(
            hidden_size=hidden, num_heads=heads, head_dim=head_dim, mlp_hidden=mlp_hidden, depth=len(layers),
            refiner_depth=len(model.noise_refiner), patch_size=patch, in_channels=int(model.in_channels),
            context_dim=context_dim, modulation_dim=modulation_dim, timestep_hidden=timestep_hidden,
            timestep_frequencies=timestep_frequencies,
            pad_multiple=int(model.pad_tokens_multiple or 1),
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x, a = arguments["x"], self.arch
        image = math.ceil(x.shape[-2] / a.patch_size) * math.ceil(x.shape[-1] / a.patch_size)
        caption = _padded(arguments["context"].shape[1], a.pad_multiple)
        padding = _padded(image, a.pad_multiple) - image
        return CallLayout(batch=x.shape[0], image_tokens=image + padding, text_tokens=caption, reference_tokens=padding)

    def derived_arguments(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        # what ComfyUI's Lumina2 model passes: the caption's unmasked tokens (at least 1), or its length without a mask
        mask = tensors.get("attention_mask")
        return {"num_tokens": max(1, int(mask.sum())) if mask is not None else int(tensors["context"].shape[1])}

    # --- blocks: the emulated patch point -----------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_arguments(self, block: BlockRef, args: tuple, kwargs: Mapping[str, Any]) -> dict:
        arguments = dict(zip(_ARGUMENTS, args))
        for name, key in (("x", "img"), ("x_mask", "mask"), ("freqs_cis", "pe"), ("adaln_input", "vec")):
            if name in kwargs:
                arguments[key] = kwargs[name]
        arguments["transformer_options"] = kwargs.get("transformer_options", {})
        if kwargs.get("timestep_zero_index") is not None:
            arguments["timestep_zero_index"] = kwargs["timestep_zero_index"]
        return arguments

    def run_original(self, forward: Callable[..., Any], block: BlockRef, args: Mapping[str, Any]) -> dict:
        extra = {"timestep_zero_index": args["timestep_zero_index"]} if args.get("timestep_zero_index") is not None else {}
        return {"img": forward(args["img"], args.get("mask"), args["pe"], args.get("vec"),
                               transformer_options=args.get("transformer_options", {}), **extra)}

    def block_result(self, block: BlockRef, out: Mapping[str, Any]) -> Any:
        return out["img"]

    # --- blocks -------------------------------------------------------------------------------
    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        img = args["img"]
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1] - layout.text_tokens, text_tokens=layout.text_tokens,
                         reference_tokens=layout.reference_tokens)

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        if args.get("timestep_zero_index") is not None and not internals.is_full:
            raise UnsupportedModelError("Dynamic DiT does not reduce Z-Image calls with reference images (Z-Image Omni) yet.")
        img = args["img"]
        mlp_rows = None if internals.mlp_tokens is None else joint_rows(layout, internals.mlp_tokens, cache)
        view = ReducedZImageBlock(self.arch, module, internals, flop_log, cache, img.device).view(mlp_rows)
        return self.run_original(type(module).forward.__get__(view), block, args)

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        ZImageWidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> ZImageTokenRouting:
        return self._routing

    def width_units(self) -> ZImageWidthUnits:
        return self._width

    def coarse_grid(self) -> ZImageCoarseGrid:
        return self._coarse

    # --- analytic FLOPs -----------------------------------------------------------------------
    def _layer_flops(self, batch: int, rows: int, mlp_rows: int, heads: int, mlp: int, modulated: bool) -> FlopBreakdown:
        a = self.arch
        d, inner = a.hidden_size, heads * a.head_dim
        return FlopBreakdown(
            modulation=linear_flops(batch, a.modulation_dim, 4 * d) if modulated else 0.0,
            qkv=linear_flops(batch * rows, d, 3 * inner),
            attention=attention_flops(batch, heads, rows, rows, a.head_dim),
            proj=linear_flops(batch * rows, inner, d),
            mlp=2 * linear_flops(batch * mlp_rows, d, mlp) + linear_flops(batch * mlp_rows, mlp, d),
        )

    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d, image, caption = a.hidden_size, layout.routable_tokens, layout.text_tokens
        embed = linear_flops(b * image, a.in_channels * a.patch_size**2, d)
        # The caption embedder runs before the caption is padded: counted over the padded length, it is overcounted by
        # at most pad_multiple - 1 rows (the layout knows the length the blocks see, not the prompt's own).
        embed += linear_flops(b * caption, a.context_dim, d)
        embed += linear_flops(b, a.timestep_frequencies, a.timestep_hidden) + linear_flops(b, a.timestep_hidden, a.modulation_dim)
        refiners = FlopBreakdown()
        for _ in range(a.refiner_depth):  # context refiner (no modulation) and noise refiner, full width
            refiners = refiners + self._layer_flops(b, caption, caption, a.num_heads, a.mlp_hidden, False)
            refiners = refiners + self._layer_flops(b, layout.image_tokens, layout.image_tokens, a.num_heads, a.mlp_hidden, True)
        rows = b * (caption + layout.image_tokens)
        final = linear_flops(b, a.modulation_dim, d) + linear_flops(rows, d, a.patch_size**2 * a.in_channels)
        return FlopBreakdown(embed=embed + refiners.total, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        a = self.arch
        heads = work.kept_heads(a.num_heads)
        mlp = work.kept_mlp(a.mlp_hidden)
        rows = work.image_tokens + work.text_tokens
        mlp_rows = work.mlp_tokens + work.text_tokens
        flops = self._layer_flops(work.batch, rows, mlp_rows, heads, mlp, True)
        return FlopBreakdown(modulation=flops.modulation, qkv=flops.qkv, attention=flops.attention, proj=flops.proj,
                             mlp=flops.mlp, extra=work.extra_flops)
