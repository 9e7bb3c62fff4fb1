"""Adapter for PixArt-Σ as ComfyUI builds it (`PixArtMS`, comfy/ldm/pixart, host model `PixArt`, 0.3.75 and 0.12.1).

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
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, class_path
from ..capabilities import CallLayout, ModelInfo
from .blocks import LINEARS, PixArtWidthSelections, ReducedPixArtBlock
from .coarse import PixArtCoarseGrid
from .routing import PixArtTokenRouting
from .width import PixArtWidthUnits

BLOCK = "block"
_ARGUMENTS = ("img", "txt", "vec", "mask", "hw")  # the block forward's positional parameters, as a replace patch names them
# A TD-LoRA gate embeds k * sigma: PixArt's sigmas reach ~157 (sqrt-linear betas), so 1000 / 160 keeps the embedding's
# times in the 0-1000 range of a DiT's own timestep embedding.
_GATE_TIME_SCALE = 1000.0 / 160.0


@dataclass(frozen=True)
class PixArtArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    patch_size: int
    in_channels: int
    out_channels: int  # in_channels * 2 with the predicted variance
    caption_channels: int  # the text encoder's width (T5-XXL: 4096)
    timestep_frequencies: int  # the timestep embedder's sinusoidal width (256)


class PixArtAdapter(ModelAdapter):
    family = "pixart"
    display_name = "PixArt-Σ"
    supported_variants = ("PixArt-Σ (512, 1024 and 2K)",)
    block_kinds = (BlockKind(BLOCK, "pixart_block", "blocks", LINEARS, emulated=True),)
    timestep_argument = "timesteps"
    emulated_model_wrappers = True

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.pixart")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if class_path(diffusion_model) != "comfy.ldm.pixart.pixartms.PixArtMS":
            self._refuse(f"the PixArt-family model {type(diffusion_model).__name__}")
        if getattr(diffusion_model, "micro_conditioning", False):
            self._refuse("PixArt-α (its size and aspect-ratio conditioning)")
        self.arch = a = self._describe(diffusion_model)
        self._blocks = tuple(BlockRef(BLOCK, i) for i in range(a.depth))
        self._info = ModelInfo(
            family=self.family, display_name=self.display_name, hidden_size=a.hidden_size, num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden, depths=((BLOCK, a.depth),),
            fields={"patch_size": str(a.patch_size), "in_channels": str(a.in_channels)},
            timestep_scale=_GATE_TIME_SCALE,
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("x_embedder.proj.weight", "y_embedder.y_proj.fc1.weight", "final_layer.linear.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = PixArtTokenRouting()
        self._width = PixArtWidthUnits(a)
        self._coarse = PixArtCoarseGrid(a, self._blocks, self._info, diffusion_model)

    def _describe(self, model: torch.nn.Module) -> PixArtArchitecture:
        hidden, heads = int(model.hidden_size), int(model.num_heads)
        blocks = list(getattr(model, "blocks", []))
        if not blocks or hidden % heads:
            self._refuse("a PixArt model without blocks or with a width that is no multiple of its heads")
        mlp_hidden = None
        for i, block in enumerate(blocks):
            where = f"blocks.{i}"
            if type(block).__name__ != "PixArtMSBlock":
                self._refuse(f"a PixArt model with an unexpected block at {where} ({type(block).__name__})")
            attn = block.attn
            if int(getattr(attn, "sr_ratio", 1)) > 1:
                self._refuse(f"PixArt with key-value compression (at {where})")
            if not isinstance(attn.q_norm, torch.nn.Identity):
                self._refuse(f"PixArt with q/k norms (at {where})")
            if self._shape(attn.qkv, f"{where}.attn.qkv") != (3 * hidden, hidden):
                self._refuse(f"a PixArt model with inconsistent attention widths at {where}")
            m, _ = self._shape(block.mlp.fc1, f"{where}.mlp.fc1")
            if mlp_hidden is not None and m != mlp_hidden:
                self._refuse(f"a PixArt model with inconsistent MLP widths at {where}")
            mlp_hidden = m
        _, caption = self._shape(model.y_embedder.y_proj.fc1, "y_embedder.y_proj.fc1")
        _, frequencies = self._shape(model.t_embedder.mlp[0], "t_embedder.mlp.0")
        return PixArtArchitecture(
            hidden_size=hidden, num_heads=heads, head_dim=hidden // heads, mlp_hidden=mlp_hidden, depth=len(blocks),
            patch_size=int(model.patch_size), in_channels=int(model.in_channels), out_channels=int(model.out_channels),
            caption_channels=caption, timestep_frequencies=frequencies,
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x, p = arguments["x"], self.arch.patch_size
        image = math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p)
        return CallLayout(batch=x.shape[0], image_tokens=image, text_tokens=arguments["context"].shape[-2])

    # --- blocks: the emulated patch point -----------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_arguments(self, block: BlockRef, args: tuple, kwargs: Mapping[str, Any]) -> dict:
        arguments = dict(zip(_ARGUMENTS, args))
        for name, key in (("x", "img"), ("y", "txt"), ("t", "vec"), ("mask", "mask"), ("HW", "hw")):
            if name in kwargs:
                arguments[key] = kwargs[name]
        if "transformer_options" in kwargs:
            arguments["transformer_options"] = kwargs["transformer_options"]
        return arguments

    def run_original(self, forward: Callable[..., Any], block: BlockRef, args: Mapping[str, Any]) -> dict:
        return {"img": forward(args["img"], args["txt"], args["vec"], args.get("mask"), args.get("hw"))}

    def block_result(self, block: BlockRef, out: Mapping[str, Any]) -> Any:
        return out["img"]

    # --- blocks -------------------------------------------------------------------------------
    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        img = args["img"]
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1], text_tokens=layout.text_tokens)

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        img = args["img"]
        view = ReducedPixArtBlock(self.arch, module, internals, flop_log, cache, img.device, img.shape[0]).view()
        return self.run_original(type(module).forward.__get__(view), block, args)

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        PixArtWidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> PixArtTokenRouting:
        return self._routing

    def width_units(self) -> PixArtWidthUnits:
        return self._width

    def coarse_grid(self) -> PixArtCoarseGrid:
        return self._coarse

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d, image, text = a.hidden_size, b * layout.image_tokens, b * layout.text_tokens
        embed = linear_flops(image, a.in_channels * a.patch_size**2, d)  # the patch embedding (a strided conv)
        embed += linear_flops(b, a.timestep_frequencies, d) + linear_flops(b, d, d) + linear_flops(b, d, 6 * d)
        embed += linear_flops(text, a.caption_channels, d) + linear_flops(text, d, d)  # the caption projection
        final = linear_flops(image, d, a.patch_size**2 * a.out_channels)
        return FlopBreakdown(embed=embed, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        """Self-attention at the kept heads; cross-attention in full for the tokens that run (its key-value projection
        over the text); the MLP at its kept width, on its tokens."""
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        inner, mlp = heads * hd, work.kept_mlp(a.mlp_hidden)
        n, t, n_mlp = work.image_tokens, work.text_tokens, work.mlp_tokens
        return FlopBreakdown(
            qkv=linear_flops(b * n, d, 3 * inner) + linear_flops(b * n, d, d) + linear_flops(b * t, d, 2 * d),
            attention=attention_flops(b, heads, n, n, hd) + attention_flops(b, a.num_heads, n, t, hd),
            proj=linear_flops(b * n, inner, d) + linear_flops(b * n, d, d),
            mlp=linear_flops(b * n_mlp, d, mlp) + linear_flops(b * n_mlp, mlp, d),
            extra=work.extra_flops,
        )
