"""Coarse-patch embedding files (DDiT): trained layers for patches f times the model's own, as safetensors.

The reasoning and the equations: docs/methods/patch_scheduler.md.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F

from ...core.files import header_problem, read_safetensors
from .schedule import FACTORS, ScheduleRange, parse_schedule

if TYPE_CHECKING:
    from ...families import ModelAdapter
    from ...families.coarse import CoarseGrid

FORMAT = "dynamic_dit.patch_embedding"
VERSION = "2"
_PARAMS = ("embed.weight", "embed.bias", "deembed.weight", "deembed.bias", "patch_id")
_KEY = re.compile(r"^factor(\d+)\.(.+)$")
_LORA_KEY = re.compile(r"^lora\.(?P<block>[a-z_]+\.\d+)\.(?P<linear>.+)\.(?P<part>down|up)$")
# factor -> block label -> linear name -> (down (r, in), up (out, r)), float32 on the CPU
BlockLoRA = Mapping[int, Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]]


@dataclass(frozen=True, eq=False)
class CoarseLayers:
    """The trained layers of one patch factor (float32, on the CPU)."""

    embed_weight: torch.Tensor  # (D, C_in * P * P)
    embed_bias: torch.Tensor  # (D,)
    patch_id: torch.Tensor  # (D,)
    deembed_weight: torch.Tensor  # (C_out * P * P, D)
    deembed_bias: torch.Tensor  # (C_out * P * P,)

    def to(self, like: torch.Tensor) -> "CoarseLayers":
        return CoarseLayers(*(t.to(device=like.device, dtype=like.dtype) for t in (
            self.embed_weight, self.embed_bias, self.patch_id, self.deembed_weight, self.deembed_bias)))


@dataclass(frozen=True, eq=False)
class PatchEmbeddingFile:
    """A validated coarse-patch embedding file."""

    name: str
    model: Mapping[str, str]  # what the file says about the model it was trained for
    layers: Mapping[int, CoarseLayers]  # factor -> layers
    lora: BlockLoRA = field(default_factory=lambda: MappingProxyType({}))  # version 2: block LoRA of coarse calls

    def check_blocks(self, adapter: "ModelAdapter") -> None:
        """Raise ValueError unless every block LoRA names a block and a block linear of the adapter's model."""
        labels = {block.label: block for block in adapter.blocks}
        for factor, blocks in self.lora.items():
            for label, linears in blocks.items():
                if label not in labels:
                    raise ValueError(f"Patch embedding '{self.name}': block LoRA for block {label}, which this "
                                     f"{adapter.display_name} model does not have.")
                known = adapter.linear_names(labels[label])
                unknown = sorted(set(linears) - set(known))
                if unknown:
                    raise ValueError(f"Patch embedding '{self.name}': block {label} has no linear {', '.join(unknown)} "
                                     f"(its linears: {', '.join(known)}).")

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(sorted(self.layers))

    def check_model(self, grid: "CoarseGrid", model_name: str) -> None:
        """Raise ValueError unless this file was trained for the model `grid` describes."""
        for key, value in grid.file_fields().items():
            found = self.model.get(key)
            if found != value:
                raise ValueError(
                    f"Patch embedding '{self.name}' was made for another model: {key} is {found} in the file, "
                    f"{value} in this model ({model_name}). Use an embedding file trained for this model."
                )

    def describe(self) -> str:
        return f"{self.name} ({', '.join(f'{f}x' for f in self.factors)})"

    def trained_schedule(self) -> tuple["ScheduleRange", ...]:
        """The manual schedule the trainer made this file for (its header's `coarse_schedule`)."""
        text = self.model.get("coarse_schedule")
        if not text:
            raise ValueError(f"Patch embedding '{self.name}' does not say which steps it was trained for (no "
                             "'coarse_schedule' in its header); use the Patch Scheduler's manual mode with a schedule.")
        return parse_schedule(text)


def save_patch_embedding_file(
    path: str | os.PathLike,
    model: Mapping[str, str],
    layers: Mapping[int, CoarseLayers | Mapping[str, torch.Tensor]],
    lora: BlockLoRA | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a coarse-patch embedding file (for tests and trainers).

    `model` is the model description (`CoarseGrid.file_fields()`); `layers` maps a factor to its
    `CoarseLayers` or to a dict with the parameter names of the format (`embed.weight`, ...); `lora` the
    block LoRA of coarse calls per factor; `metadata` extra header entries (a trainer's).
    """
    from ...core.files import save_safetensors

    tensors = {}
    for factor, params in layers.items():
        if isinstance(params, CoarseLayers):
            params = _as_params(params)
        for param, tensor in params.items():
            tensors[f"factor{factor}.{param}"] = tensor.detach().to("cpu").contiguous()
    for factor, blocks in (lora or {}).items():
        for label, linears in blocks.items():
            for linear, (down, up) in linears.items():
                tensors[f"factor{factor}.lora.{label}.{linear}.down"] = down.detach().to("cpu").float().contiguous()
                tensors[f"factor{factor}.lora.{label}.{linear}.up"] = up.detach().to("cpu").float().contiguous()
    header = {**{k: str(v) for k, v in (metadata or {}).items()}, **{k: str(v) for k, v in model.items()},
              "format": FORMAT, "version": VERSION, "factors": ",".join(str(f) for f in sorted(layers))}
    save_safetensors(tensors, path, header)


def load_patch_embedding_file(path: str | os.PathLike, name: str | None = None) -> PatchEmbeddingFile:
    """Read and validate a coarse-patch embedding file; any problem raises ValueError naming it."""
    name = name or os.path.basename(os.fspath(path))
    tensors, metadata = read_safetensors(path, f"Patch embedding '{name}'", part=FORMAT)
    return _validate(name, metadata, tensors)


def _validate(name: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> PatchEmbeddingFile:
    def fail(message: str) -> ValueError:
        return ValueError(f"Patch embedding '{name}': {message}")

    problem = header_problem(metadata, FORMAT, VERSION, "patch embedding")
    if problem is not None:
        raise fail(problem)
    try:
        factors = tuple(int(f) for f in metadata.get("factors", "").split(","))
    except ValueError:
        raise fail(f"metadata 'factors' is {metadata.get('factors')!r}, expected a list such as '2,4'.") from None
    if not factors or any(f not in FACTORS for f in factors) or len(set(factors)) != len(factors):
        raise fail(f"metadata 'factors' is {metadata.get('factors')!r}; each factor must be one of {FACTORS}, once.")
    model = {k: v for k, v in metadata.items() if k not in ("format", "version", "factors")}
    for key in ("architecture", "hidden_size", "patch_size", "in_channels", "out_channels"):
        if key not in model:
            raise fail(f"metadata has no '{key}'.")
    try:
        hidden, patch = int(model["hidden_size"]), int(model["patch_size"])
        channels_in, channels_out = int(model["in_channels"]), int(model["out_channels"])
    except ValueError:
        raise fail("metadata 'hidden_size', 'patch_size', 'in_channels' and 'out_channels' must be integers.") from None

    grouped: dict[int, dict[str, torch.Tensor]] = {f: {} for f in factors}
    lora_parts: dict[int, dict[str, dict[str, dict[str, torch.Tensor]]]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        lora_match = _LORA_KEY.match(match.group(2)) if match is not None else None
        if match is None or int(match.group(1)) not in grouped or (match.group(2) not in _PARAMS and lora_match is None):
            raise fail(f"unexpected tensor '{key}'; expected factor<f>.{{{', '.join(_PARAMS)}}} or "
                       f"factor<f>.lora.<block>.<linear>.{{down,up}} for factors {factors}.")
        if not tensor.is_floating_point():
            raise fail(f"tensor '{key}' has dtype {tensor.dtype}, expected a floating-point dtype.")
        if not torch.isfinite(tensor).all():
            raise fail(f"tensor '{key}' contains NaN or infinite values.")
        if lora_match is not None:
            linear = lora_parts.setdefault(int(match.group(1)), {}).setdefault(lora_match["block"], {}).setdefault(lora_match["linear"], {})
            linear[lora_match["part"]] = tensor.float()
        else:
            grouped[int(match.group(1))][match.group(2)] = tensor.float()

    layers = {factor: _layers(fail, factor, params, hidden, factor * patch, channels_in, channels_out)
              for factor, params in grouped.items()}
    lora = {factor: MappingProxyType({label: MappingProxyType(_lora_pairs(fail, factor, label, linears))
                                      for label, linears in blocks.items()})
            for factor, blocks in lora_parts.items()}
    return PatchEmbeddingFile(name, MappingProxyType(model), MappingProxyType(layers), MappingProxyType(lora))


def _layers(fail, factor: int, params: dict[str, torch.Tensor], hidden: int, size: int, channels_in: int,
            channels_out: int) -> CoarseLayers:
    """Factor `factor`'s layers, each tensor there with the shape the model's sizes give it."""
    expected = {
        "embed.weight": (hidden, channels_in * size * size),
        "embed.bias": (hidden,),
        "patch_id": (hidden,),
        "deembed.weight": (channels_out * size * size, hidden),
        "deembed.bias": (channels_out * size * size,),
    }
    for param, shape in expected.items():
        if param not in params:
            raise fail(f"missing tensor 'factor{factor}.{param}' (expected shape {shape}).")
        if tuple(params[param].shape) != shape:
            raise fail(f"tensor 'factor{factor}.{param}' has shape {tuple(params[param].shape)}, expected {shape}.")
    return CoarseLayers(params["embed.weight"], params["embed.bias"], params["patch_id"], params["deembed.weight"],
                        params["deembed.bias"])


def _lora_pairs(fail, factor: int, label: str, linears: dict[str, dict[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for linear, parts in linears.items():
        where = f"factor{factor}.lora.{label}.{linear}"
        if set(parts) != {"down", "up"}:
            raise fail(f"block LoRA '{where}' needs both .down and .up.")
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise fail(f"block LoRA '{where}': down {tuple(down.shape)} and up {tuple(up.shape)} are not (r, in) and (out, r).")
        pairs[linear] = (down, up)
    return pairs


def _as_params(layers: CoarseLayers) -> dict[str, torch.Tensor]:
    return {
        "embed.weight": layers.embed_weight,
        "embed.bias": layers.embed_bias,
        "patch_id": layers.patch_id,
        "deembed.weight": layers.deembed_weight,
        "deembed.bias": layers.deembed_bias,
    }


# --- layers derived from the native ones (initialisation for a trainer; exact references for tests) ---
def resize_matrix(patch: int, factor: int, kind: str) -> torch.Tensor:
    """The linear map between a p x p patch and its P x P (P = f p) resize, for one channel.

    - "area": (p*p, P*P) area downsampling (mean of each f x f block);
    - "nearest": (P*P, p*p) nearest upsampling (each pixel repeated f x f), the exact right inverse of "area";
    - "bilinear": (P*P, p*p) bilinear upsampling inside the patch (half-pixel centres, edges clamped);
    - "pinv_bilinear": (p*p, P*P) its pseudo-inverse (FlexiViT's PI-resize), the least-squares downsampling.
    """
    size = patch * factor
    if kind == "area":
        basis = torch.eye(size * size, dtype=torch.float64).reshape(-1, 1, size, size)
        return F.avg_pool2d(basis, factor).reshape(size * size, patch * patch).T.contiguous()
    basis = torch.eye(patch * patch, dtype=torch.float64).reshape(-1, 1, patch, patch)
    if kind == "nearest":
        return F.interpolate(basis, scale_factor=factor, mode="nearest").reshape(patch * patch, -1).T.contiguous()
    upsample = F.interpolate(basis, size=(size, size), mode="bilinear", align_corners=False).reshape(patch * patch, -1).T
    if kind == "bilinear":
        return upsample.contiguous()
    if kind == "pinv_bilinear":
        return torch.linalg.pinv(upsample).contiguous()
    raise ValueError(f"unknown resize kind {kind!r}; expected area, nearest, bilinear or pinv_bilinear")


def derived_layers(
    img_in_weight: torch.Tensor,
    img_in_bias: torch.Tensor | None,
    final_weight: torch.Tensor,
    final_bias: torch.Tensor | None,
    patch: int,
    factor: int,
    resize: str = "pinv_bilinear",
) -> CoarseLayers:
    """Coarse layers computed from the native img_in and final linear, without training.

    `resize="pinv_bilinear"` is DDiT's / FlexiViT's initialisation (embedding W B+, de-embedding B W_out);
    `resize="area"` embeds the area-downsampled patch with the native weights (with a zero de-embedding,
    the scheduler's training-free path exactly) and repeats each native output pixel f x f.
    """
    down, up = {"pinv_bilinear": ("pinv_bilinear", "bilinear"), "area": ("area", "nearest")}[resize]
    hidden = img_in_weight.shape[0]
    channels_in = img_in_weight.shape[1] // (patch * patch)
    channels_out = final_weight.shape[0] // (patch * patch)
    down_matrix = resize_matrix(patch, factor, down)  # (p², P²)
    up_matrix = resize_matrix(patch, factor, up)  # (P², p²)
    w_in = img_in_weight.double().reshape(hidden, channels_in, patch * patch)
    embed = torch.einsum("dcq,qs->dcs", w_in, down_matrix).reshape(hidden, -1)
    w_out = final_weight.double().reshape(channels_out, patch * patch, hidden)
    deembed = torch.einsum("sq,cqd->csd", up_matrix, w_out).reshape(-1, hidden)
    b_out = final_bias.double().reshape(channels_out, patch * patch) if final_bias is not None else None
    deembed_bias = (
        torch.einsum("sq,cq->cs", up_matrix, b_out).reshape(-1) if b_out is not None else torch.zeros(deembed.shape[0])
    )
    embed_bias = img_in_bias if img_in_bias is not None else torch.zeros(hidden)
    return CoarseLayers(
        embed.float(), embed_bias.detach().float().clone(), torch.zeros(hidden), deembed.float(), deembed_bias.float()
    )


__all__ = [
    "BlockLoRA",
    "CoarseLayers",
    "FORMAT",
    "PatchEmbeddingFile",
    "VERSION",
    "derived_layers",
    "load_patch_embedding_file",
    "resize_matrix",
    "save_patch_embedding_file",
]
