"""Tiny models of other families, built as the host builds a loaded checkpoint: its model detection reads a
skeleton of the family's checkpoint keys and fills every model parameter it knows (fields newer hosts add
included, e.g. Flux's `txt_ids_dims` in ComfyUI 0.12); the test sets only the sizes."""
from __future__ import annotations

import torch

import comfy.model_patcher

from comfyui_dynamic_dit.dynamic_core.comfy_integration.reference import detected_model_config


def detected_model(keys: dict[str, tuple[int, ...]], **sizes):
    """A ModelPatcher around the host's model for the checkpoint keys (name -> shape), with `sizes` set."""
    skeleton = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    model_config = detected_model_config(skeleton, sizes, None, "test")
    model_config.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(model_config.get_model({}), torch.device("cpu"), torch.device("cpu"))


def _flux_like(hidden: int, in_features: int, **extra) -> dict[str, tuple[int, ...]]:
    return {"img_in.weight": (hidden, in_features), "txt_in.weight": (hidden, 64),
            "double_blocks.0.img_attn.norm.key_norm.scale": (64,), "single_blocks.0.norm.key_norm.scale": (64,), **extra}


def tiny_chroma():
    """A Chroma model (Flux.1 without the modulation layers; a distilled guidance network instead)."""
    return detected_model(_flux_like(128, 256, **{"distilled_guidance_layer.norms.0.scale": (64,)}),
                          axes_dim=[16, 24, 24], num_heads=2, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1)
