"""Adapter for Qwen-Image and Qwen-Image Edit as ComfyUI builds them (`QwenImageTransformer2DModel`, comfy/ldm/qwen_image,
0.3.75 and 0.12.1).

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
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, class_path
from ..capabilities import CallLayout, ModelInfo
from .coarse import QwenImageCoarseGrid
from .blocks import STREAM_LINEARS, QwenWidthSelections, ReducedQwenBlock, call_block
from .routing import QwenTokenRouting
from .width import QwenWidthUnits

BLOCK = "block"
TIME_ZERO_METHOD = "index_timestep_zero"


@dataclass(frozen=True)
class QwenImageArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    patch_size: int
    in_channels: int  # latent channels (the patch embedding reads in_channels * patch^2)
    out_channels: int
    context_dim: int  # the text encoder's width (joint_attention_dim)
    default_ref_method: str


class QwenImageAdapter(ModelAdapter):
    family = "qwen_image"
    display_name = "Qwen-Image"
    supported_variants = ("Qwen-Image", "Qwen-Image Edit (2509, 2511)", "Qwen-Image Lightning LoRAs on either")
    block_kinds = (BlockKind(BLOCK, "double_block", "transformer_blocks", STREAM_LINEARS["img"] + STREAM_LINEARS["txt"]),)

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.qwen_image")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if class_path(diffusion_model) != "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel":
            self._refuse(f"the Qwen-Image variant {type(diffusion_model).__name__}")
        if host_model_name is not None and host_model_name != "QwenImage":
            self._refuse(f"the Qwen-Image-based '{host_model_name}' model type")
        self.arch = a = self._describe(diffusion_model)
        self._blocks = tuple(BlockRef(BLOCK, i) for i in range(a.depth))
        self._info = ModelInfo(
            family=self.family, display_name=self.display_name, hidden_size=a.hidden_size, num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden, depths=((BLOCK, a.depth),),
            fields={"patch_size": str(a.patch_size), "in_channels": str(a.in_channels), "out_channels": str(a.out_channels)},
            timestep_scale=1000.0,  # Timesteps(scale=1000) on sigma
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("img_in.weight", "txt_in.weight", "proj_out.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = QwenTokenRouting()
        self._width = QwenWidthUnits(a)

    def _describe(self, model: torch.nn.Module) -> QwenImageArchitecture:
        blocks = list(getattr(model, "transformer_blocks", []))
        if not blocks:
            self._refuse("a Qwen-Image model without blocks")
        first = blocks[0]
        heads, head_dim = int(first.num_attention_heads), int(first.attention_head_dim)
        hidden = int(model.inner_dim)
        mlp_hidden = None
        for i, block in enumerate(blocks):
            where = f"transformer_blocks.{i}"
            if type(block).__name__ != "QwenImageTransformerBlock" or int(block.attn.heads) != heads:
                self._refuse(f"a Qwen-Image model with an unexpected block at {where}")
            for stream in ("img", "txt"):
                names = STREAM_LINEARS[stream]
                widths = [self._shape(block.get_submodule(n), f"{where}.{n}") for n in names[1:5]]
                if any(w != (hidden, hidden) for w in widths) or heads * head_dim != hidden:
                    self._refuse(f"a Qwen-Image model with inconsistent attention widths at {where}")
                m, _ = self._shape(block.get_submodule(names[5]), f"{where}.{names[5]}")
                if mlp_hidden is not None and m != mlp_hidden:
                    self._refuse(f"a Qwen-Image model with inconsistent MLP widths at {where}")
                mlp_hidden = m
        patch = int(model.patch_size)
        _, img_in = self._shape(model.img_in, "img_in")
        _, context_dim = self._shape(model.txt_in, "txt_in")
        proj_out, _ = self._shape(model.proj_out, "proj_out")
        return QwenImageArchitecture(
            hidden_size=hidden, num_heads=heads, head_dim=head_dim, mlp_hidden=mlp_hidden, depth=len(blocks), patch_size=patch,
            in_channels=img_in // (patch * patch), out_channels=proj_out // (patch * patch), context_dim=context_dim,
            default_ref_method=str(getattr(model, "default_ref_method", "index")),
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def coarse_grid(self) -> QwenImageCoarseGrid:
        return QwenImageCoarseGrid(self.arch, self._blocks, self._info)

    def _tokens_of(self, latent: torch.Tensor) -> int:
        p = self.arch.patch_size
        return math.ceil(latent.shape[-2] / p) * math.ceil(latent.shape[-1] / p)

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x = arguments["x"]
        references = sum(self._tokens_of(ref) for ref in arguments.get("ref_latents") or ())
        method = (arguments.get("kwargs") or {}).get("ref_latents_method", self.arch.default_ref_method)
        at_zero = references > 0 and method == TIME_ZERO_METHOD
        mask = arguments.get("attention_mask")
        if mask is not None and not torch.is_floating_point(mask):  # as the host's forward turns it additive
            mask = (mask - 1).to(x.dtype) * torch.finfo(x.dtype).max
        return CallLayout(batch=x.shape[0], image_tokens=self._tokens_of(x) + references, text_tokens=arguments["context"].shape[1],
                          reference_tokens=references, references_at_time_zero=at_zero, timesteps=2 if at_zero else 1,
                          block_context=mask)

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        img = args["img"]
        return BlockWork(batch=img.shape[0], image_tokens=img.shape[1], text_tokens=args["txt"].shape[1],
                         reference_tokens=layout.reference_tokens)

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        img = args["img"]
        view = ReducedQwenBlock(self.arch, module, internals, flop_log, cache, img.device).view(img.shape[1], layout.reference_tokens)
        txt, img = call_block(type(module), view, args, layout)
        return {"txt": txt, "img": img}

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        QwenWidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> QwenTokenRouting:
        return self._routing

    def width_units(self) -> QwenWidthUnits:
        return self._width

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d, patch_features = a.hidden_size, a.patch_size**2
        embed = linear_flops(b * layout.image_tokens, a.in_channels * patch_features, d)
        embed += linear_flops(b * layout.text_tokens, a.context_dim, d)
        embed += linear_flops(b * layout.timesteps, 256, d) + linear_flops(b * layout.timesteps, d, d)  # time_text_embed
        final = linear_flops(b, d, 2 * d) + linear_flops(b * layout.image_tokens, d, a.out_channels * patch_features)
        return FlopBreakdown(embed=embed, final=final)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        mlp = work.kept_mlp(a.mlp_hidden)
        n, t = work.image_tokens, work.text_tokens
        n_mlp = work.mlp_tokens
        inner = heads * hd
        return FlopBreakdown(
            modulation=2 * linear_flops(b, d, 6 * d),
            qkv=linear_flops(b * (n + t), d, 3 * inner),
            attention=attention_flops(b, heads, n + t, n + t, hd),
            proj=linear_flops(b * (n + t), inner, d),
            mlp=linear_flops(b * (n_mlp + t), d, mlp) + linear_flops(b * (n_mlp + t), mlp, d),
            extra=work.extra_flops,
        )
