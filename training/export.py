"""Writing a trained student as files today's loaders read: one file per part, with shared metadata.

The width router goes into the width router format (`methods/width_file.py`, read by the Dynamic Width
Patcher), the TD-LoRA experts and gate into the TD-LoRA format (`methods/td_lora_file.py`, read by the
TD-LoRA Loader), the coarse-patch layers and their block LoRA into the patch embedding format
(`methods/patch_embedding_file.py` version 2, read by the Dynamic Patch Scheduler; the header's
`coarse_schedule` says which steps it was trained for), the token routers and keep ratios into the token-router
format (`methods/token_router_file.py`, kind "diffcr", read by the Token Router). Each loader validates its own format strictly
(no foreign tensors), so the parts cannot share one file; both carry the same training metadata (base architecture, base weight
fingerprint, parts, target, steps, command; the model part from `ModelInfo.header`, the one header builder
of every format), and the file names share a stem:
`<name>.width.safetensors`, `<name>.td_lora.safetensors`, `<name>.patch_embedding.safetensors`,
`<name>.token_router.safetensors`. `save_bundle` puts them into one file, `<name>.safetensors` (the bundle
format of `files.py`, which every loader reads its part from): what the Train node and the CLI write.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..methods.patch_scheduler.file import save_patch_embedding_file
from ..methods.td_lora.experts import GateWeights
from ..methods.td_lora.file import ExpertLayer, save_td_lora_file
from ..methods.token_router.file import save_router_file
from ..methods.width.file import RouterHeader, WidthRouter
from .student import DynamicStudent
from ..methods.token_router.trainable import FILE_ROUTER

SUFFIXES = {"width": ".width.safetensors", "td_lora": ".td_lora.safetensors", "coarse": ".patch_embedding.safetensors",
            "tokens": ".token_router.safetensors"}


def training_metadata(student: DynamicStudent, *, target: float, steps: int, command: str, base_model: str,
                      extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The metadata every file of one training run carries (all strings, as safetensors requires)."""
    spec = student.spec
    return {
        **student.adapter.model_info().header(weights=student.diffusion_model),  # with the base-weight fingerprint
        "base_model": base_model,
        "trainer": "dynamic_dit.train",
        "trained_parts": ",".join(spec.parts),
        "width_parts": spec.width_parts,
        "target_flops": f"{target:g}",
        "train_steps": str(steps),
        "command": command,
        "spec": json.dumps({k: getattr(spec, k) for k in ("experts", "rank", "mlp_groups", "gate_hidden", "gate_embed")}),
        **({"coarse_schedule": spec.coarse_schedule, "coarse_init": spec.coarse_init} if "coarse" in spec.parts else {}),
        **({"ratio_bins": str(spec.ratio_bins), "min_keep": f"{spec.min_keep:g}", "token_mode": spec.token_mode}
           if "tokens" in spec.parts else {}),
        **{k: str(v) for k, v in (extra or {}).items()},
    }


def width_router(student: DynamicStudent, name: str = "trained router") -> WidthRouter:
    """The router in the file's parametrisation: logits = W f + b on the raw features (the training
    normalisation (f - mean) / scale folded in). A part that is not thinned keeps every unit (bias +1)."""
    header = RouterHeader.for_adapter(student.adapter, student.group_count)
    mean, scale = student.feature_mean.detach().float().cpu(), float(student.feature_scale)
    tensors: dict[str, torch.Tensor] = {}
    for row, block in enumerate(student.blocks):
        for part, units, thinned, weight, bias in (
            ("heads", student.head_count, student.thin_heads, getattr(student, "head_weight", None), getattr(student, "head_bias", None)),
            ("mlp", student.group_count, student.thin_mlp, getattr(student, "group_weight", None), getattr(student, "group_bias", None)),
        ):
            if thinned:
                w = weight[row].detach().float().cpu() / scale
                b = bias[row].detach().float().cpu() - w @ mean
            else:
                w, b = torch.zeros(units, header.feature_dim), torch.ones(units)
            tensors[f"{block.label}.{part}.weight"], tensors[f"{block.label}.{part}.bias"] = w.contiguous(), b.contiguous()
    return WidthRouter(header, tensors, name)


def td_lora_layers(student: DynamicStudent) -> tuple[dict[str, ExpertLayer], GateWeights | None]:
    k, r = student.spec.experts, student.spec.rank
    layers = {}
    for key in student.lora_paths:
        down, up = student.lora_down[key].detach().float().cpu(), student.lora_up[key].detach().float().cpu()
        # stacked expert-major along the rank axis: rows k*r..(k+1)*r of down, columns of up
        layers[key.replace("/", ".")] = ExpertLayer(
            down.reshape(k, r, -1).contiguous(), up.reshape(up.shape[0], k, r).permute(1, 0, 2).contiguous(), float(r)
        )
    gate = None
    if k > 1:
        g = student.gate
        gate = GateWeights(*(t.detach().float().cpu().contiguous() for t in (g[0].weight, g[0].bias, g[2].weight, g[2].bias)))
    return layers, gate


def coarse_lora(student: DynamicStudent) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The coarse calls' block LoRA as the patch embedding file holds it: block label -> linear -> (down, up)."""
    blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, (block, name) in student.lora_paths.items():
        pair = (student.lora_down[key].detach().float().cpu(), student.lora_up[key].detach().float().cpu())
        blocks.setdefault(block.label, {})[name] = pair
    return blocks


def save_student(student: DynamicStudent, stem: str | os.PathLike, metadata: Mapping[str, str]) -> list[Path]:
    """Write one file per trained part next to `stem` (a path without the suffix); returns the paths."""
    stem = Path(stem)
    for suffix in (".safetensors", *SUFFIXES.values()):
        if stem.name.endswith(suffix):
            stem = stem.with_name(stem.name[: -len(suffix)])
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if "width" in student.spec.parts:
        router = width_router(student, stem.name)
        path = stem.with_name(stem.name + SUFFIXES["width"])
        from ..core.files import save_safetensors

        save_safetensors(router.tensors(), path, {**metadata, **router.header.metadata()})
        written.append(path)
    if "td_lora" in student.spec.parts:
        layers, gate = td_lora_layers(student)
        path = stem.with_name(stem.name + SUFFIXES["td_lora"])
        save_td_lora_file(path, layers, student.adapter.model_info().header(), gate, metadata=metadata)
        written.append(path)
    if student.coarse is not None:
        path = stem.with_name(stem.name + SUFFIXES["coarse"])
        factor = student.coarse.factor
        with torch.no_grad():
            layers = student.coarse.layers()
        save_patch_embedding_file(path, student.grid.file_fields(), {factor: layers}, {factor: coarse_lora(student)},
                                  metadata=metadata)
        written.append(path)
    if student.tokens is not None:
        path = stem.with_name(stem.name + SUFFIXES["tokens"])
        routers, ratios, bounds = student.tokens.export([block.label for block in student.blocks])
        save_router_file(path, student.adapter, FILE_ROUTER[student.tokens.kind], routers, ratios, bounds, metadata=metadata)
        written.append(path)
    return written


def save_bundle(student: DynamicStudent, path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """One file with every trained part (each written by its own format's writer first, then bundled)."""
    from ..core.files import read_safetensors, write_bundle

    path = Path(path)
    if not path.name.endswith(".safetensors"):
        path = path.with_name(path.name + ".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        parts = {}
        for written in save_student(student, Path(folder) / "run", metadata):
            tensors, part_metadata = read_safetensors(written, written.name)
            parts[part_metadata["format"]] = (tensors, part_metadata)
        write_bundle(path, parts, dict(metadata))
    return path


__all__ = ["SUFFIXES", "save_bundle", "coarse_lora", "save_student", "td_lora_layers", "training_metadata", "width_router"]
