"""Coarse patch grids for Flux.1 as ComfyUI runs it (see `coarse.py` for the seam).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from einops import rearrange

from ...core.flops import linear_flops
from ...core.slicing import ModuleView
from ..base import BlockRef
from ..capabilities import CallLayout, ModelInfo
from ..coarse import CoarseGrid, PostInputPatch, TrainingFreeCoarseGrid, centred_rope_options

if TYPE_CHECKING:
    from .adapter import FluxArchitecture


class FluxCoarseGrid(CoarseGrid):
    family_label = "Flux"

    def __init__(self, arch: "FluxArchitecture", blocks: tuple[BlockRef, ...], info: ModelInfo) -> None:
        super().__init__(arch, blocks, info, noisy_channels=arch.out_channels)

    def file_fields(self) -> dict[str, str]:
        return self._info.header("patch_size", "in_channels", "out_channels")

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        extra = arguments.get("kwargs") or {}
        if arguments.get("control") is not None:
            return "ControlNet residuals are laid out per native token"
        if extra.get("attention_mask") is not None:
            return "the attention mask is laid out per native token"
        if arguments.get("ref_latents"):
            method = extra.get("ref_latents_method", getattr(diffusion_model.params, "default_ref_method", "offset"))
            if method == "uxo":
                return "'uxo' reference latents are placed after the native grid"
        return None

    def coarse_options(self, transformer_options: Mapping[str, Any], factor: int,
                       post_input: PostInputPatch | None = None) -> dict:
        return centred_rope_options(transformer_options, factor, post_input)

    def patchify(self, x: torch.Tensor, size: int) -> torch.Tensor:
        return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=size, pw=size)

    def unpatchify(self, tokens: torch.Tensor, rows: int, cols: int, size: int) -> torch.Tensor:
        return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=rows, w=cols, ph=size, pw=size)

    def replace_image_tokens(self, embedded: dict, tokens: torch.Tensor) -> dict:
        img = embedded["img"]
        count = tokens.shape[1]
        return {**embedded, "img": torch.cat((tokens.to(img.dtype), img[:, count:]), dim=1)}

    def image_hidden(self, block: BlockRef, block_out: Mapping[str, Any], layout: CallLayout, count: int) -> torch.Tensor:
        img = block_out["img"]
        if "txt" in block_out:  # double-stream block: the image stream alone
            return img[:, :count]
        text_tokens = layout.text_tokens
        return img[:, text_tokens : text_tokens + count]  # single-stream block: [text, image, references]

    def final_conditioning(self, block_args: Mapping[str, Any]) -> torch.Tensor:
        return block_args["vec"]  # Flux modulates its final layer by the same vec as the blocks

    def final_layer(self, diffusion_model: torch.nn.Module, hidden: torch.Tensor, conditioning: torch.Tensor,
                    linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return ModuleView(diffusion_model.final_layer, linear=linear)(hidden, conditioning)

    def native_linears(self, diffusion_model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
        return diffusion_model.img_in, diffusion_model.final_layer.linear

    def final_modulation_flops(self, batch: int) -> float:
        d = self.arch.hidden_size
        return linear_flops(batch, d, 2 * d)


class Flux2CoarseGrid(TrainingFreeCoarseGrid, FluxCoarseGrid):
    """Flux 2 positions its tokens and takes its time like Flux.1 (same `process_img`, timestep = sigma), so
    training-free coarse steps run as on Flux.1; its final layer is modulated by the call's own vector, which
    the blocks never receive (they get the shared modulations), so a trained coarse embedding has no seam."""

    no_trained_reason = ("Flux 2 modulates its final layer by a vector its blocks never see: coarse steps on Flux 2 "
                         "run training-free, without a trained embedding")
