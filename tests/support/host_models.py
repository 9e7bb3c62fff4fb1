"""Tiny models of other families, built as the host builds a loaded checkpoint: its model detection reads a
skeleton of the family's checkpoint keys and fills every model parameter it knows (fields newer hosts add
included, e.g. Flux's `txt_ids_dims` in ComfyUI 0.12); the test sets only the sizes."""
from __future__ import annotations

import torch

import comfy.model_detection
import comfy.model_patcher


def detected_model(keys: dict[str, tuple[int, ...]], **sizes):
    """A ModelPatcher around the host's model for the checkpoint keys (name -> shape), with `sizes` set."""
    skeleton = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    unet_config = comfy.model_detection.detect_unet_config(skeleton, "")
    assert unet_config is not None, f"this ComfyUI detects no model from {sorted(keys)}"
    unet_config.update(sizes)
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, skeleton)
    assert model_config is not None, f"this ComfyUI has no model class for {unet_config}"
    model_config.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(model_config.get_model({}), torch.device("cpu"), torch.device("cpu"))


def _flux_like(hidden: int, in_features: int, **extra) -> dict[str, tuple[int, ...]]:
    return {"img_in.weight": (hidden, in_features), "txt_in.weight": (hidden, 64),
            "double_blocks.0.img_attn.norm.key_norm.scale": (64,), "single_blocks.0.norm.key_norm.scale": (64,), **extra}


def tiny_chroma():
    """A Chroma model (Flux.1 without the modulation layers; a distilled guidance network instead)."""
    return detected_model(_flux_like(128, 256, **{"distilled_guidance_layer.norms.0.scale": (64,)}),
                          axes_dim=[16, 24, 24], num_heads=2, in_dim=64, out_dim=128, hidden_dim=64, n_layers=1)
