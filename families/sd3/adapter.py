"""Adapter for SD3 and SD3.5 (Large, Large Turbo, Medium with MMDiT-X) as ComfyUI builds them
(`OpenAISignatureMMDITWrapper`, comfy/ldm/modules/diffusionmodules/mmdit.py, 0.3.75 and 0.12.1).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ...core.fingerprint import sample_parameters
from ...core.flops import FlopBreakdown, attention_flops, linear_flops
from ...core.slicing import RunIndexCache
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter
from ..capabilities import CallLayout, ModelInfo
from .coarse import SD3CoarseGrid
from .blocks import STREAMS, ReducedSD3Block, SD3WidthSelections, stream_linears
from .routing import SD3TokenRouting
from .width import SD3WidthUnits

JOINT = "joint"


@dataclass(frozen=True)
class SD3Architecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    patch_size: int
    in_channels: int
    out_channels: int
    context_dim: int
    pooled_dim: int | None
    register_tokens: int
    second_attention: tuple[int, ...]  # MMDiT-X blocks (an extra image self-attention)
    position_table: int | None = None  # the side of the absolute position table positions are cropped from


class SD3Adapter(ModelAdapter):
    family = "sd3"
    display_name = "SD3 / SD3.5"
    supported_variants = ("SD3 Medium", "SD3.5 Large", "SD3.5 Large Turbo", "SD3.5 Medium (MMDiT-X)")
    timestep_argument = "timesteps"
    emulated_model_wrappers = True

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__ == "comfy.ldm.modules.diffusionmodules.mmdit"

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if type(diffusion_model).__name__ != "OpenAISignatureMMDITWrapper" or (host_model_name not in (None, "SD3")):
            self._refuse(f"the MMDiT-based '{host_model_name or type(diffusion_model).__name__}' model type")
        if getattr(diffusion_model, "context_processor", None) is not None:
            self._refuse("an MMDiT with a context processor")
        self.arch = a = self._describe(diffusion_model)
        every = tuple(dict.fromkeys(name for i in range(a.depth) for stream in STREAMS
                                    for name in stream_linears(self._pre_only(i, stream), i in a.second_attention and stream == "x_block", stream)))
        self.block_kinds = (BlockKind(JOINT, "double_block", "joint_blocks", every),)
        self._blocks = tuple(BlockRef(JOINT, i) for i in range(a.depth))
        self._info = ModelInfo(
            family=self.family, display_name=self.display_name, hidden_size=a.hidden_size, num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden, depths=((JOINT, a.depth),),
            fields={"patch_size": str(a.patch_size), "in_channels": str(a.in_channels), "out_channels": str(a.out_channels)},
            timestep_scale=1000.0,  # the model sampling passes t = 1000 * sigma
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("context_embedder.weight", "final_layer.linear.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = SD3TokenRouting()
        self._width = SD3WidthUnits(a, self)

    def _pre_only(self, index: int, stream: str) -> bool:
        return stream == "context_block" and index == self.arch.depth - 1

    def _describe(self, model: torch.nn.Module) -> SD3Architecture:
        blocks = list(getattr(model, "joint_blocks", []))
        if not blocks:
            self._refuse("an MMDiT without joint blocks")
        heads = int(blocks[0].x_block.attn.num_heads)
        hidden = int(model.hidden_size) if hasattr(model, "hidden_size") else self._shape(blocks[0].x_block.attn.qkv, "qkv")[1]
        mlp_hidden, second = None, []
        for i, block in enumerate(blocks):
            where = f"joint_blocks.{i}"
            for stream in STREAMS:
                part = getattr(block, stream)
                if type(part).__name__ != "DismantledBlock" or part.scale_mod_only or part.pre_only != (stream == "context_block" and i == len(blocks) - 1):
                    self._refuse(f"an MMDiT with an unexpected block at {where}.{stream}")
                if self._shape(part.attn.qkv, f"{where}.{stream}.attn.qkv")[0] != 3 * hidden or int(part.attn.num_heads) != heads:
                    self._refuse(f"an MMDiT with inconsistent attention widths at {where}")
                if not part.pre_only:
                    if type(part.mlp).__name__ != "Mlp":
                        self._refuse(f"an MMDiT with a SwiGLU MLP at {where}")
                    m, _ = self._shape(part.mlp.fc1, f"{where}.{stream}.mlp.fc1")
                    if mlp_hidden is not None and m != mlp_hidden:
                        self._refuse(f"an MMDiT with inconsistent MLP widths at {where}")
                    mlp_hidden = m
            if block.x_block.x_block_self_attn:
                second.append(i)
        patch = int(model.patch_size)
        y = getattr(model, "y_embedder", None)
        final_out, _ = self._shape(model.final_layer.linear, "final_layer.linear")
        return SD3Architecture(
            hidden_size=hidden, num_heads=heads, head_dim=hidden // heads, mlp_hidden=mlp_hidden, depth=len(blocks),
            patch_size=patch, in_channels=int(model.in_channels), out_channels=final_out // (patch * patch),
            context_dim=self._shape(model.context_embedder, "context_embedder")[1],
            pooled_dim=self._shape(y.mlp[0], "y_embedder.mlp.0")[1] if y is not None else None,
            register_tokens=int(getattr(model, "register_length", 0)), second_attention=tuple(second),
            position_table=int(model.pos_embed_max_size) if getattr(model, "pos_embed", None) is not None
            and getattr(model, "pos_embed_max_size", None) else None,
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def coarse_grid(self) -> SD3CoarseGrid:
        return SD3CoarseGrid(self.arch, self._blocks, self._info)

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x, p = arguments["x"], self.arch.patch_size
        context = arguments.get("context")
        text = (context.shape[1] if context is not None else 0) + self.arch.register_tokens
        return CallLayout(batch=x.shape[0], image_tokens=math.ceil(x.shape[-2] / p) * math.ceil(x.shape[-1] / p), text_tokens=text)

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def linear_names(self, block: BlockRef) -> tuple[str, ...]:
        second = block.index in self.arch.second_attention
        return tuple(name for stream in STREAMS
                     for name in stream_linears(self._pre_only(block.index, stream), second and stream == "x_block", stream))

    def linear_layers(self, module: torch.nn.Module, block: BlockRef) -> dict[str, torch.nn.Module]:
        return {name: module.get_submodule(name) for name in self.linear_names(block)}

    def modulation_width(self, block: BlockRef, stream: str) -> int:
        """Rows of a stream's modulation linear: shift/scale/gate for attention and MLP (and the second attention)."""
        d = self.arch.hidden_size
        if self._pre_only(block.index, stream):
            return 2 * d
        return (9 if stream == "x_block" and block.index in self.arch.second_attention else 6) * d

    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        img = args["img"]
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1], text_tokens=args["txt"].shape[1])

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        view = ReducedSD3Block(self.arch, module, internals, flop_log, cache, args["img"].device).view()
        txt, img = type(module).forward(view, args["txt"], args["img"], c=args["vec"],
                                        transformer_options=args.get("transformer_options", {}))
        return {"txt": txt, "img": img}

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        SD3WidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> SD3TokenRouting:
        return self._routing

    def width_units(self) -> SD3WidthUnits:
        return self._width

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d, patch_features = a.hidden_size, a.in_channels * a.patch_size**2
        embed = linear_flops(b * layout.image_tokens, patch_features, d)
        embed += linear_flops(b, 256, d) + linear_flops(b, d, d)  # t_embedder
        if a.pooled_dim is not None:
            embed += linear_flops(b, a.pooled_dim, d) + linear_flops(b, d, d)  # y_embedder
        embed += linear_flops(b * (layout.text_tokens - a.register_tokens), a.context_dim, d)
        final = linear_flops(b, d, 2 * d) + linear_flops(b * layout.image_tokens, d, a.out_channels * a.patch_size**2)
        return FlopBreakdown(embed=embed, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        mlp = work.kept_mlp(a.mlp_hidden)
        n, t = work.image_tokens, work.text_tokens
        n_mlp = work.mlp_tokens
        inner = heads * hd
        pre_only = self._pre_only(block.index, "context_block")
        second = block.index in a.second_attention
        t_out = 0 if pre_only else t  # a pre-only context branch has no output projection and no MLP
        modulation = sum(linear_flops(b, d, self.modulation_width(block, stream)) for stream in STREAMS)
        qkv = linear_flops(b * (n + t), d, 3 * inner) + (linear_flops(b * n, d, 3 * inner) if second else 0.0)
        attention = attention_flops(b, heads, n + t, n + t, hd) + (attention_flops(b, heads, n, n, hd) if second else 0.0)
        proj = linear_flops(b * (n + t_out), inner, d) + (linear_flops(b * n, inner, d) if second else 0.0)
        mlp_flops = linear_flops(b * (n_mlp + t_out), d, mlp) + linear_flops(b * (n_mlp + t_out), mlp, d)
        return FlopBreakdown(modulation=modulation, qkv=qkv, attention=attention, proj=proj, mlp=mlp_flops, extra=work.extra_flops)
