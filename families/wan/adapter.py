"""Adapter for Wan 2.1 and 2.2 video models as ComfyUI builds them (comfy/ldm/wan/model.py, `WanModel`).

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
from ..known_families import HOST_MODEL_NAMES
from .blocks import ReducedWanBlock, WanWidthSelections
from .coarse import WanCoarseGrid
from .routing import WanTokenRouting
from .width import WanWidthUnits

BLOCK = "block"
_SELF = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")
_CROSS = ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o")
_CROSS_IMAGE = ("cross_attn.k_img", "cross_attn.v_img")
_FFN = ("ffn.0", "ffn.2")
_CLIP_WIDTH = 1280  # MLPProj: CLIP ViT-H penultimate features -> D


@dataclass(frozen=True)
class WanArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    depth: int
    patch_size: tuple[int, int, int]  # (time, height, width)
    in_channels: int  # channels entering patch_embedding (i2v: noise + mask + image)
    out_channels: int
    text_dim: int
    freq_dim: int
    image_embedding: bool  # i2v / FLF2V: CLIP image tokens join the cross-attention context


class WanAdapter(ModelAdapter):
    family = "wan"
    display_name = "Wan 2.1 / 2.2"
    supported_variants = ("Wan 2.1 T2V", "Wan 2.1 I2V / FLF2V", "Wan 2.2 A14B T2V / I2V (high- and low-noise experts)",
                          "Wan 2.2 TI2V 5B")
    _HOST_NAMES = ("WAN21", "WAN22")

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.wan")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if host_model_name is not None and host_model_name not in self._HOST_NAMES:
            self._refuse(HOST_MODEL_NAMES.get(host_model_name, f"the Wan-based '{host_model_name}' model type"))
        if class_path(diffusion_model) != "comfy.ldm.wan.model.WanModel":
            self._refuse(f"the Wan variant {type(diffusion_model).__name__} (its blocks take inputs of their own)")
        self.arch = self._describe(diffusion_model)
        a = self.arch
        self._blocks = tuple(BlockRef(BLOCK, i) for i in range(a.depth))
        linears = _SELF + _CROSS + (_CROSS_IMAGE if a.image_embedding else ()) + _FFN
        # The host calls its blocks' patches ("double_block", i) whatever the family (forward_orig).
        self.block_kinds = (BlockKind(BLOCK, "double_block", "blocks", linears),)
        self._info = ModelInfo(
            family=self.family,
            display_name=self.display_name,
            hidden_size=a.hidden_size,
            num_heads=a.num_heads,
            mlp_hidden=a.ffn_dim,
            depths=((BLOCK, a.depth),),
            fields={"patch_size": ",".join(map(str, a.patch_size)), "in_channels": str(a.in_channels),
                    "out_channels": str(a.out_channels)},
            timestep_scale=1000.0,  # the model sampling passes t = 1000 * sigma, embedded as it is
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("text_embedding.0.weight", "time_embedding.0.weight", "head.head.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = WanTokenRouting()
        self._width = WanWidthUnits(a)
        self._coarse = WanCoarseGrid(a, self._blocks, self._info) if a.patch_size[1] == a.patch_size[2] else None

    def _describe(self, model: torch.nn.Module) -> WanArchitecture:
        hidden, heads = int(model.dim), int(model.num_heads)
        if hidden % heads:
            self._refuse(f"a Wan model whose width {hidden} is not a multiple of its {heads} heads")
        blocks = list(getattr(model, "blocks", []))
        if not blocks:
            self._refuse("a Wan model without blocks")
        for i, block in enumerate(blocks):
            where = f"blocks.{i}"
            if type(block).__name__ != "WanAttentionBlock":
                self._refuse(f"a Wan model with an unexpected block at {where} ({type(block).__name__})")
            for name in ("q", "k", "v", "o"):
                if self._shape(getattr(block.self_attn, name), f"{where}.self_attn.{name}") != (hidden, hidden):
                    self._refuse(f"a Wan model with inconsistent attention widths at {where}")
            ffn = block.ffn
            if len(ffn) != 3 or self._shape(ffn[0], f"{where}.ffn.0") != (int(model.ffn_dim), hidden):
                self._refuse(f"a Wan model with an unexpected FFN at {where}")
        patch = tuple(int(p) for p in model.patch_size)
        final_out, _ = self._shape(model.head.head, "head.head")
        text_out, text_dim = self._shape(model.text_embedding[0], "text_embedding.0")
        return WanArchitecture(
            hidden_size=hidden,
            num_heads=heads,
            head_dim=hidden // heads,
            ffn_dim=int(model.ffn_dim),
            depth=len(blocks),
            patch_size=patch,  # type: ignore[arg-type]
            in_channels=int(model.patch_embedding.weight.shape[1]),
            out_channels=final_out // math.prod(patch),
            text_dim=text_dim,
            freq_dim=int(model.freq_dim),
            image_embedding=getattr(model, "img_emb", None) is not None,
        )

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x = arguments["x"]
        pt, ph, pw = self.arch.patch_size
        frames = math.ceil(x.shape[-3] / pt)
        extra = arguments.get("kwargs") or {}
        concat = arguments.get("time_dim_concat")
        if concat is not None:  # latents concatenated along time run as more frames
            frames += math.ceil(concat.shape[-3] / pt)
        per_frame = math.ceil(x.shape[-2] / ph) * math.ceil(x.shape[-1] / pw)
        tokens = frames * per_frame
        if extra.get("reference_latent") is not None:  # ref_conv: one more frame of tokens, in front
            tokens += per_frame
        clip = arguments.get("clip_fea")
        timestep = arguments["timestep"]
        return CallLayout(
            batch=x.shape[0],
            image_tokens=tokens,
            text_tokens=arguments["context"].shape[1],
            frames=frames,
            image_context_tokens=int(clip.shape[-2]) if clip is not None else 0,
            timesteps=max(1, timestep.numel() // max(1, x.shape[0])),
        )

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        x = args["img"]
        return BlockWork(batch=x.shape[0], image_tokens=x.shape[1], text_tokens=args["txt"].shape[1])

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        view = ReducedWanBlock(self.arch, module, internals, flop_log, cache, args["img"].device).view()
        x = type(module).forward(
            view, args["img"], e=args["vec"], freqs=args["pe"], context=args["txt"],
            context_img_len=layout.image_context_tokens or None, transformer_options=args.get("transformer_options", {}),
        )
        return {"img": x}

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        WanWidthSelections.prepare(cache, self.arch, decisions, device)

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> WanTokenRouting:
        return self._routing

    def width_units(self) -> WanWidthUnits:
        return self._width

    def coarse_grid(self) -> WanCoarseGrid | None:
        return self._coarse

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d = a.hidden_size
        embed = linear_flops(b * layout.image_tokens, a.in_channels * math.prod(a.patch_size), d)  # the Conv3d patch embedding
        embed += linear_flops(b * layout.text_tokens, a.text_dim, d) + linear_flops(b * layout.text_tokens, d, d)
        rows = b * layout.timesteps
        embed += linear_flops(rows, a.freq_dim, d) + linear_flops(rows, d, d) + linear_flops(rows, d, 6 * d)
        if a.image_embedding and layout.image_context_tokens:
            clip = b * layout.image_context_tokens
            embed += linear_flops(clip, _CLIP_WIDTH, _CLIP_WIDTH) + linear_flops(clip, _CLIP_WIDTH, d)
        final = linear_flops(b * layout.image_tokens, d, a.out_channels * math.prod(a.patch_size))
        return FlopBreakdown(embed=embed, final=final)

    def full_block_work(self, block: BlockRef, layout: CallLayout) -> BlockWork:
        context = layout.text_tokens + (layout.image_context_tokens if self.arch.image_embedding else 0)
        return BlockWork(batch=layout.batch, image_tokens=layout.image_tokens, text_tokens=context)

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        """Self-attention: q and k always at full width (their RMSNorm spans every head), v, attention and
        o at the kept heads; cross-attention in full for the tokens that run; the FFN at its kept width."""
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        ffn = work.kept_mlp(a.ffn_dim)
        n, c = work.image_tokens, work.text_tokens
        n_ffn = work.mlp_tokens
        inner = heads * hd
        # cross-attention: q and o on the tokens, k and v on the whole context (text, and CLIP image tokens)
        cross_qkv = linear_flops(b * n, d, d) + 2 * linear_flops(b * c, d, d)
        return FlopBreakdown(
            qkv=2 * linear_flops(b * n, d, d) + linear_flops(b * n, d, inner) + cross_qkv,
            attention=attention_flops(b, heads, n, n, hd) + attention_flops(b, a.num_heads, n, c, hd),
            proj=linear_flops(b * n, inner, d) + linear_flops(b * n, d, d),
            mlp=linear_flops(b * n_ffn, d, ffn) + linear_flops(b * n_ffn, ffn, d),
            extra=work.extra_flops,
        )
