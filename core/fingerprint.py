"""A fingerprint of a model's base weights, so a trained file is refused on another base model.

Shape checks (the width router and TD-LoRA headers) cannot tell FLUX.1-dev from FLUX.1-schnell or one
fine-tune from another: they share every shape. The fingerprint is a fixed sample of weight values
(64 strided values from each of the few tensors the adapter names in `ModelInfo.fingerprint_parameters`:
ones every variant of the family has), stored in the file's header (`ModelInfo.header(weights=...)`)
as text. Two models match when the samples agree within a relative distance of 0.1: the same base in
bf16, fp16, fp32 or fp8, or with a light LoRA merged, matches; a different training run (relative
distance ~1.4 for independent weights) does not.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

if TYPE_CHECKING:
    from ..families.capabilities import ModelInfo

METADATA_KEY = "base_fingerprint"
_VALUES_PER_TENSOR = 64
_TOLERANCE = 0.1


def sample_parameters(diffusion_model: torch.nn.Module, stem: Sequence[str], first_block: torch.nn.Module,
                      last_block: torch.nn.Module) -> tuple[str, ...]:
    """What an adapter samples: the `stem` parameters the model has, the first 2-D weight of its first
    block and the last 2-D weight of its last block (present in every depth and variant)."""
    paths = {id(module): path for path, module in diffusion_model.named_modules()}
    names = [name for name in stem if _has_parameter(diffusion_model, name)]
    for module, pick in ((first_block, 0), (last_block, -1)):
        matrices = [name for name, p in module.named_parameters() if p.ndim == 2]
        if matrices:
            names.append(f"{paths[id(module)]}.{matrices[pick]}")
    return tuple(names)


def _has_parameter(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_parameter(name)
    except AttributeError:
        return False
    return True


def _sample_tensors(diffusion_model: torch.nn.Module, info: "ModelInfo | None") -> list[torch.Tensor]:
    names = [n for n in (info.fingerprint_parameters if info is not None else ()) if _has_parameter(diffusion_model, n)]
    if names:
        return [diffusion_model.get_parameter(n) for n in names]
    return [p for _, p in diffusion_model.named_parameters() if p.ndim == 2][:4]


def fingerprint(diffusion_model: torch.nn.Module, info: "ModelInfo | None" = None) -> list[float]:
    """The sample of base weight values (float32, 5 significant digits)."""
    values: list[float] = []
    with torch.no_grad():
        for tensor in _sample_tensors(diffusion_model, info):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // _VALUES_PER_TENSOR)
            picked = flat[::step][:_VALUES_PER_TENSOR].to(device="cpu", dtype=torch.float32)
            values += [float(f"{v:.5g}") for v in picked.tolist()]
    return values


def fingerprint_text(diffusion_model: torch.nn.Module, info: "ModelInfo | None" = None) -> str:
    return json.dumps(fingerprint(diffusion_model, info))


def fingerprint_problem(metadata: Mapping[str, str], diffusion_model: torch.nn.Module, info: "ModelInfo | None",
                        name: str) -> str | None:
    """Why a file's `base_fingerprint` does not match this model, or None (match, or a file without one)."""
    stored = metadata.get(METADATA_KEY)
    if stored is None:
        return None
    try:
        theirs = torch.tensor(json.loads(stored), dtype=torch.float32)
    except (ValueError, TypeError):
        return f"'{name}': its metadata '{METADATA_KEY}' is not a list of numbers; the file is damaged."
    mine = torch.tensor(fingerprint(diffusion_model, info), dtype=torch.float32)
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


def check_fingerprint(metadata: Mapping[str, str], diffusion_model: torch.nn.Module, info: "ModelInfo | None",
                      name: str) -> None:
    """Raise ValueError when a trained file names other base weights (`info`: the model's `ModelInfo`)."""
    problem = fingerprint_problem(metadata, diffusion_model, info, name)
    if problem is not None:
        raise ValueError(problem)
