"""A fingerprint of a model's base weights, so a trained file is refused on another base model.

Shape checks (the width router and TD-LoRA headers) cannot tell FLUX.1-dev from FLUX.1-schnell or one
fine-tune from another: they share every shape. The fingerprint is a fixed sample of weight values
(64 strided values from each of a few tensors every Flux has), stored in the file's metadata as text.
Two models match when the samples agree within a relative distance of 0.1: the same base in bf16, fp16,
fp32 or fp8, or with a light LoRA merged, matches; a different training run (relative distance ~1.4 for
independent weights) does not.
"""
from __future__ import annotations

import json
from typing import Mapping

import torch

METADATA_KEY = "base_fingerprint"
_VALUES_PER_TENSOR = 64
_TOLERANCE = 0.1


def _sample_tensors(diffusion_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = dict(diffusion_model.named_parameters())
    names = [n for n in params if params[n].ndim == 2]
    # the input and output projections and the first and last block linears: present in every variant
    chosen = [n for n in ("img_in.weight", "txt_in.weight", "final_layer.linear.weight") if n in params]
    blocks = [n for n in names if n.startswith(("double_blocks.", "single_blocks."))]
    if blocks:
        chosen += [blocks[0], blocks[-1]]
    return [(n, params[n]) for n in (chosen or names[:4])]


def fingerprint(diffusion_model: torch.nn.Module) -> list[float]:
    """The sample of base weight values (float32, 5 significant digits)."""
    values: list[float] = []
    with torch.no_grad():
        for _, tensor in _sample_tensors(diffusion_model):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _VALUES_PER_TENSOR)
            picked = flat[::step][:_VALUES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
            values += [float(f"{v:.5g}") for v in picked.tolist()]
    return values


def fingerprint_text(diffusion_model: torch.nn.Module) -> str:
    return json.dumps(fingerprint(diffusion_model))


def fingerprint_problem(metadata: Mapping[str, str], diffusion_model: torch.nn.Module, name: str) -> str | None:
    """Why a file's `base_fingerprint` does not match this model, or None (match, or a file without one)."""
    stored = metadata.get(METADATA_KEY)
    if stored is None:
        return None
    try:
        theirs = torch.tensor(json.loads(stored), dtype=torch.float32)
    except (ValueError, TypeError):
        return f"'{name}': its metadata '{METADATA_KEY}' is not a list of numbers; the file is damaged."
    mine = torch.tensor(fingerprint(diffusion_model), dtype=torch.float32)
    if theirs.shape != mine.shape:
        return (f"'{name}' was trained for another base model (its weight fingerprint has {theirs.numel()} values, "
                f"this model's {mine.numel()}). Train it again for this model.")
    distance = float((theirs - mine).norm() / mine.norm().clamp_min(1e-12))
    if distance > _TOLERANCE:
        trained_on = metadata.get("base_model", "another model")
        return (f"'{name}' was trained for another base model ({trained_on}): this model's weights differ from "
                f"those it was trained on (fingerprint distance {distance:.2f}, at most {_TOLERANCE} for the same "
                "base). A trained file only fits the weights it was trained with; train it again for this model.")
    return None


def check_fingerprint(metadata: Mapping[str, str], diffusion_model: torch.nn.Module, name: str) -> None:
    problem = fingerprint_problem(metadata, diffusion_model, name)
    if problem is not None:
        raise ValueError(problem)
