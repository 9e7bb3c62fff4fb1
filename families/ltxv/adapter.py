"""Adapter for LTX-Video 0.9 as ComfyUI builds it (`LTXVModel`, comfy/ldm/lightricks, host model `LTXV`, 0.3.75 and
0.12.1): dynamic width (self-attention heads, feed-forward groups), token routing over the video tokens and LoRA-style
extras (TD-LoRA) on the blocks' linears, through the host's own `patches_replace["dit"]` blocks. Coarse patches are
not offered for this family yet (`None`).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ...core.fingerprint import sample_parameters
from ...core.flops import FlopBreakdown, attention_flops, linear_flops
from ...core.slicing import RunIndexCache
from ..base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, class_path
from ..capabilities import CallLayout, ModelInfo
from .blocks import LINEARS, LTXVWidthSelections, ReducedLTXVBlock
from .coarse import LTXVCoarseGrid
from .routing import LTXVTokenRouting
from .width import LTXVWidthUnits

BLOCK = "block"
_TIMESTEP_FREQUENCIES = 256  # the adaLN-single timestep embedder's sinusoidal width


@dataclass(frozen=True)
class LTXVArchitecture:
    hidden_size: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    depth: int
    in_channels: int  # the latent's channels (patch size 1: one token per latent pixel and frame)
    out_channels: int
    caption_channels: int  # the text encoder's width (T5-XXL: 4096)


class LTXVAdapter(ModelAdapter):
    family = "ltxv"
    display_name = "LTX-Video"
    supported_variants = ("LTX-Video 0.9 (2B and 13B, text- and image-to-video)",)
    # The host calls its blocks' patches ("double_block", i), as Flux names them.
    block_kinds = (BlockKind(BLOCK, "double_block", "transformer_blocks", LINEARS),)
    scalar_arguments = ("frame_rate",)  # LTXVConditioning's frames per second: the time axis of the RoPE positions

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.lightricks")

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        if class_path(diffusion_model) != "comfy.ldm.lightricks.model.LTXVModel":
            self._refuse(f"the LTX model {type(diffusion_model).__name__} (LTX-2's video and audio streams)")
        self.arch = a = self._describe(diffusion_model)
        self._blocks = tuple(BlockRef(BLOCK, i) for i in range(a.depth))
        self._info = ModelInfo(
            family=self.family, display_name=self.display_name, hidden_size=a.hidden_size, num_heads=a.num_heads,
            mlp_hidden=a.mlp_hidden, depths=((BLOCK, a.depth),),
            fields={"in_channels": str(a.in_channels), "caption_channels": str(a.caption_channels)},
            timestep_scale=1000.0,  # the model embeds t = 1000 * sigma
            fingerprint_parameters=sample_parameters(
                diffusion_model, ("patchify_proj.weight", "caption_projection.linear_1.weight", "proj_out.weight"),
                self.block_module(diffusion_model, self._blocks[0]), self.block_module(diffusion_model, self._blocks[-1]),
            ),
        )
        self._routing = LTXVTokenRouting()
        self._width = LTXVWidthUnits(a, self)
        self._coarse = LTXVCoarseGrid(a, self._blocks, self._info)

    def _describe(self, model: torch.nn.Module) -> LTXVArchitecture:
        blocks = list(getattr(model, "transformer_blocks", []))
        if not blocks:
            self._refuse("an LTX-Video model without blocks")
        hidden = int(model.inner_dim)
        heads, head_dim = int(blocks[0].attn1.heads), int(blocks[0].attn1.dim_head)
        mlp_hidden = None
        for i, block in enumerate(blocks):
            where = f"transformer_blocks.{i}"
            if type(block).__name__ != "BasicTransformerBlock":
                self._refuse(f"an LTX-Video model with an unexpected block at {where} ({type(block).__name__})")
            for attn in ("attn1", "attn2"):
                if self._shape(getattr(block, attn).to_q, f"{where}.{attn}.to_q") != (hidden, hidden):
                    self._refuse(f"an LTX-Video model with inconsistent attention widths at {where}")
            m, _ = self._shape(block.ff.net[0].proj, f"{where}.ff.net.0.proj")
            if mlp_hidden is not None and m != mlp_hidden:
                self._refuse(f"an LTX-Video model with inconsistent feed-forward widths at {where}")
            mlp_hidden = m
        if heads * head_dim != hidden:
            self._refuse("an LTX-Video model whose heads do not fill its width")
        if self._shape(blocks[0].attn2.to_k, "transformer_blocks.0.attn2.to_k")[1] != hidden:
            self._refuse("an LTX-Video model whose text context is not of its width")
        _, in_channels = self._shape(model.patchify_proj, "patchify_proj")
        out_channels, _ = self._shape(model.proj_out, "proj_out")
        _, caption = self._shape(model.caption_projection.linear_1, "caption_projection.linear_1")
        return LTXVArchitecture(hidden_size=hidden, num_heads=heads, head_dim=head_dim, mlp_hidden=mlp_hidden,
                                depth=len(blocks), in_channels=in_channels, out_channels=out_channels,
                                caption_channels=caption)

    # --- what the model is --------------------------------------------------------------------
    def model_info(self) -> ModelInfo:
        return self._info

    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        x, timestep = arguments["x"], arguments["timestep"]
        frames = x.shape[-3]
        return CallLayout(batch=x.shape[0], image_tokens=frames * x.shape[-2] * x.shape[-1],
                          text_tokens=arguments["context"].shape[-2], frames=frames,
                          timesteps=max(1, timestep.numel() // max(1, x.shape[0])))

    def derived_arguments(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The frame rate as the number the model takes, from the trainer's per-sample rows of it."""
        rate = tensors.get("frame_rate")
        if rate is None:
            return {}
        values = rate.reshape(-1).unique()
        if values.numel() != 1:
            raise ValueError(f"LTX-Video: one training batch mixes frame rates {values.tolist()}; train one frame rate at a time.")
        return {"frame_rate": float(values[0])}

    # --- blocks -------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        return self._blocks

    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        return BlockWork(batch=args["img"].shape[0], image_tokens=args["img"].shape[1], text_tokens=args["txt"].shape[1])

    def run_block(self, module: torch.nn.Module, block: BlockRef, args: Mapping[str, Any], internals: BlockInternals,
                  flop_log: list[float], layout: CallLayout, cache: RunIndexCache) -> dict:
        reduced = ReducedLTXVBlock(self.arch, module, internals, flop_log, cache, args["img"].device)
        x = type(module).forward(reduced.view(), args["img"], context=args["txt"], attention_mask=args["attention_mask"],
                                 timestep=args["vec"], pe=reduced.positions(args["pe"]),
                                 transformer_options=args.get("transformer_options", {}))
        return {"img": x}

    def prepare_reductions(self, decisions: Iterable[BlockInternals], cache: RunIndexCache, device: torch.device) -> None:
        LTXVWidthSelections.prepare(cache, self.arch, decisions, device)

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> dict[str, tuple[int, int, int]]:
        a, b = self.arch, work.batch
        d, mlp, inner = a.hidden_size, work.kept_mlp(a.mlp_hidden), work.kept_heads(a.num_heads) * a.head_dim
        n, t, n_mlp = b * work.image_tokens, b * work.text_tokens, b * work.mlp_tokens
        sizes = {"attn1.to_q": (n, d, d), "attn1.to_k": (n, d, d), "attn1.to_v": (n, d, inner), "attn1.to_out.0": (n, inner, d)}
        sizes.update({"attn2.to_q": (n, d, d), "attn2.to_k": (t, d, d), "attn2.to_v": (t, d, d), "attn2.to_out.0": (n, d, d)})
        return {**sizes, "ff.net.0.proj": (n_mlp, d, mlp), "ff.net.2": (n_mlp, mlp, d)}

    # --- capabilities -------------------------------------------------------------------------
    def token_routing(self) -> LTXVTokenRouting:
        return self._routing

    def width_units(self) -> LTXVWidthUnits:
        return self._width

    def coarse_grid(self) -> LTXVCoarseGrid:
        return self._coarse

    # --- analytic FLOPs -----------------------------------------------------------------------
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        a, b = self.arch, layout.batch
        d, image, text, rows = a.hidden_size, b * layout.image_tokens, b * layout.text_tokens, b * layout.timesteps
        embed = linear_flops(image, a.in_channels, d)  # patchify_proj
        embed += linear_flops(rows, _TIMESTEP_FREQUENCIES, d) + linear_flops(rows, d, d) + linear_flops(rows, d, 6 * d)
        embed += linear_flops(text, a.caption_channels, d) + linear_flops(text, d, d)  # the caption projection
        return FlopBreakdown(embed=embed, final=linear_flops(image, d, a.out_channels))

    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        """Self-attention: q and k always at full width (their norm and RoPE span every head), v, attention and the
        output projection at the kept heads; cross-attention in full for the tokens that run, over the whole text; the
        feed-forward at its kept width, on its tokens."""
        a, b = self.arch, work.batch
        d, hd = a.hidden_size, a.head_dim
        heads = work.kept_heads(a.num_heads)
        inner = heads * hd
        n, t, n_mlp = work.image_tokens, work.text_tokens, work.mlp_tokens
        mlp = work.kept_mlp(a.mlp_hidden)
        return FlopBreakdown(
            qkv=2 * linear_flops(b * n, d, d) + linear_flops(b * n, d, inner) + linear_flops(b * n, d, d)
            + 2 * linear_flops(b * t, d, d),
            attention=attention_flops(b, heads, n, n, hd) + attention_flops(b, a.num_heads, n, t, hd),
            proj=linear_flops(b * n, inner, d) + linear_flops(b * n, d, d),
            mlp=linear_flops(b * n_mlp, d, mlp) + linear_flops(b * n_mlp, mlp, d),
            extra=work.extra_flops,
        )
