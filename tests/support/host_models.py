"""Tiny models of other families, built as the host builds a loaded checkpoint: its model detection reads a
skeleton of the family's checkpoint keys and fills every model parameter it knows (fields newer hosts add
included, e.g. Flux's `txt_ids_dims` in ComfyUI 0.12); the test sets only the sizes."""
from __future__ import annotations

import torch

import comfy.model_patcher

from comfyui_dynamic_dit.demo.reference import detected_model_config


def detected_model(keys: dict[str, tuple[int, ...]], **sizes):
    """A ModelPatcher around the host's model for the checkpoint keys (name -> shape), with `sizes` set."""
    skeleton = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    model_config = detected_model_config(skeleton, sizes, None, "test")
    model_config.set_inference_dtype(torch.float32, None)
    return comfy.model_patcher.ModelPatcher(model_config.get_model({}), torch.device("cpu"), torch.device("cpu"))


def tiny_auraflow():
    """An AuraFlow model (a DiT family this pack does not run: what an unsupported model looks like)."""
    return detected_model({"double_layers.0.attn.w1q.weight": (64, 64), "single_layers.0.attn.w1q.weight": (64, 64),
                           "positional_encoding": (1, 16, 64), "cond_seq_linear.weight": (64, 2048)},
                          dim=64, n_heads=2, global_conddim=64)
