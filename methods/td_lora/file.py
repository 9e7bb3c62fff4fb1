"""The TD-LoRA file format: tensors and header of a TD-LoRA safetensors file, validated on their own
(the check against a model is `td_lora.bind_layers`); see the README section "TD-LoRA file format".
The header names the model with `ModelInfo.header` (`td_lora.architecture_metadata`).
"""
from __future__ import annotations

import math
import os
from types import MappingProxyType
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...core.files import read_safetensors
from .experts import DEFAULT_MAX_PERIOD, GATE_PARAMS, GateNetwork, GateWeights, LowRankLayer, TDLoRA


FORMAT = "td_lora"
VERSION = 1

_LAYER_SUFFIXES = ("lora_A", "lora_B", "alpha")


@dataclass(frozen=True, eq=False)
class ExpertLayer:
    """One adapted layer as a file (and a trainer) sees it."""

    lora_A: torch.Tensor  # (K, r, in)
    lora_B: torch.Tensor  # (K, out, r)
    alpha: float
    gate: GateWeights | None = None  # per-layer gating only


def td_lora_state_dict(
    layers: Mapping[str, ExpertLayer],
    architecture: Mapping[str, Any],
    gate: GateWeights | None = None,
    *,
    time_scale: float | None = None,
    max_period: float = DEFAULT_MAX_PERIOD,
    metadata: Mapping[str, str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a TD-LoRA file (validated by parsing them back)."""
    if not layers:
        raise ValueError("a TD-LoRA needs at least one layer")
    first = next(iter(layers.values()))
    experts, rank = int(first.lora_A.shape[0]), int(first.lora_A.shape[1])
    per_layer = any(layer.gate is not None for layer in layers.values())
    if experts > 1 and gate is None and not per_layer:
        raise ValueError(f"K={experts} experts need a gate: pass `gate` (shared by all layers) or a gate per layer.")
    if gate is not None and per_layer:
        raise ValueError("pass either a shared `gate` or per-layer gates, not both.")
    gating = "none" if experts == 1 and gate is None and not per_layer else ("per_layer" if per_layer else "shared")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        tensors[f"{path}.lora_A"] = layer.lora_A.contiguous()
        tensors[f"{path}.lora_B"] = layer.lora_B.contiguous()
        tensors[f"{path}.alpha"] = torch.tensor(float(layer.alpha), dtype=torch.float32)
        if layer.gate is not None:
            tensors.update({k: v.contiguous() for k, v in layer.gate.tensors(f"{path}.gate.").items()})
    if gate is not None:
        tensors.update({k: v.contiguous() for k, v in gate.tensors("gate.").items()})
    header = {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        **{str(k): str(v) for k, v in architecture.items()},
        "format": FORMAT,
        "version": str(VERSION),
        "experts": str(experts),
        "rank": str(rank),
        "gating": gating,
    }
    if gating != "none":
        header["gate_max_period"] = repr(float(max_period))
        if time_scale is not None:  # otherwise the gate embeds sigma as the model embeds its timestep
            header["gate_time_scale"] = repr(float(time_scale))
    parse_td_lora(tensors, header, "TD-LoRA being saved")
    return tensors, header


def save_td_lora_file(
    path: str | os.PathLike,
    layers: Mapping[str, ExpertLayer],
    architecture: Mapping[str, Any],
    gate: GateWeights | None = None,
    **options: Any,
) -> None:
    """Write a TD-LoRA file (safetensors). `architecture`: e.g. `architecture_metadata(adapter)`."""
    from ...core.files import save_safetensors

    tensors, header = td_lora_state_dict(layers, architecture, gate, **options)
    save_safetensors(tensors, path, header)


def is_td_lora(metadata: Mapping[str, str]) -> bool:
    return metadata.get("format") == FORMAT


def _int_field(metadata: Mapping[str, str], name: str, source: str, minimum: int = 1) -> int:
    raw = metadata.get(name)
    try:
        value = int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{source}: metadata '{name}' must be an integer, found {raw!r}.") from None
    if value < minimum:
        raise ValueError(f"{source}: metadata '{name}' must be at least {minimum}, found {value}.")
    return value


def _float_field(metadata: Mapping[str, str], name: str, source: str, default: float | None) -> float | None:
    raw = metadata.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{source}: metadata '{name}' must be a number, found {raw!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{source}: metadata '{name}' must be a positive number, found {raw!r}.")
    return value


def _check_tensor(tensors: Mapping[str, torch.Tensor], key: str, shape: tuple[int | None, ...], source: str, what: str) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{source}: missing key '{key}' ({what}).")
    tensor = tensors[key]
    if not tensor.is_floating_point():
        raise ValueError(f"{source}: '{key}' must be a floating-point tensor, found {tensor.dtype}.")
    if tensor.ndim != len(shape) or any(want is not None and have != want for have, want in zip(tensor.shape, shape)):
        wanted = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, expected {wanted} ({what}).")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{source}: '{key}' contains NaN or infinite values.")
    return tensor


def _parse_gate(
    tensors: Mapping[str, torch.Tensor], prefix: str, experts: int, source: str, time_scale: float | None, max_period: float
) -> GateNetwork:
    weight1 = _check_tensor(tensors, f"{prefix}0.weight", (None, None), source, "gate Linear 1: hidden x embedding")
    hidden, embed = weight1.shape
    if embed % 2:
        raise ValueError(f"{source}: '{prefix}0.weight' has {embed} input columns; the sinusoidal embedding size must be even.")
    bias1 = _check_tensor(tensors, f"{prefix}0.bias", (hidden,), source, "gate Linear 1 bias")
    weight2 = _check_tensor(tensors, f"{prefix}2.weight", (experts, hidden), source, "gate Linear 2: K x hidden")
    bias2 = _check_tensor(tensors, f"{prefix}2.bias", (experts,), source, "gate Linear 2 bias")
    return GateNetwork(GateWeights(weight1, bias1, weight2, bias2), time_scale, max_period)


def parse_td_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], source: str) -> TDLoRA:
    """Validate a TD-LoRA file's tensors and metadata on their own (the model check is `bind_layers`)."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{source}: metadata 'format' is {metadata.get('format')!r}, expected {FORMAT!r}.")
    version = _int_field(metadata, "version", source)
    if version > VERSION:
        raise ValueError(f"{source}: TD-LoRA format version {version} is newer than this node pack reads ({VERSION}); update the pack.")
    experts = _int_field(metadata, "experts", source)
    rank = _int_field(metadata, "rank", source)
    gating = metadata.get("gating", "none" if experts == 1 else None)
    if gating not in ("none", "shared", "per_layer") or (gating == "none") != (experts == 1):
        raise ValueError(
            f"{source}: metadata 'gating' is {gating!r}; K={experts} needs "
            + ("'none'." if experts == 1 else "'shared' (one gate, keys gate.*) or 'per_layer' (keys <layer>.gate.*).")
        )
    time_scale = _float_field(metadata, "gate_time_scale", source, None)  # None: the model's timestep scale
    max_period = _float_field(metadata, "gate_max_period", source, DEFAULT_MAX_PERIOD)
    if "architecture" not in metadata:
        raise ValueError(f"{source}: the metadata has no 'architecture' (a TD-LoRA file must name the model it was made for).")

    layer_paths: list[str] = []
    for key in tensors:
        path, _, suffix = key.rpartition(".")
        if suffix == "lora_A" and path:
            layer_paths.append(path)
        elif suffix in _LAYER_SUFFIXES or key.startswith("gate.") or ".gate." in key:
            continue
        else:
            raise ValueError(
                f"{source}: unexpected key '{key}' (a TD-LoRA v{VERSION} file holds <layer>.lora_A, <layer>.lora_B, "
                f"<layer>.alpha, gate.* or <layer>.gate.*)."
            )
    if not layer_paths:
        raise ValueError(f"{source}: no adapted layers (no '<layer>.lora_A' keys).")
    shared = _parse_gate(tensors, "gate.", experts, source, time_scale, max_period) if gating == "shared" else None
    layers: dict[str, LowRankLayer] = {}
    expected_keys = set()
    for path in sorted(layer_paths):
        lora_a = _check_tensor(tensors, f"{path}.lora_A", (experts, rank, None), source, "K experts x rank x in_features")
        lora_b = _check_tensor(
            tensors, f"{path}.lora_B", (experts, None, rank), source, f"K experts x out_features x rank, for {path}.lora_A"
        )
        alpha_tensor = _check_tensor(tensors, f"{path}.alpha", (), source, "a scalar; the bypass is scaled by alpha / rank")
        gate = None
        if gating == "per_layer":
            gate = _parse_gate(tensors, f"{path}.gate.", experts, source, time_scale, max_period)
            expected_keys |= {f"{path}.gate.{p}" for p in GATE_PARAMS}
        layers[path] = LowRankLayer.from_experts(lora_a, lora_b, float(alpha_tensor), gate)
        expected_keys |= {f"{path}.{s}" for s in _LAYER_SUFFIXES}
    if shared is not None:
        expected_keys |= {f"gate.{p}" for p in GATE_PARAMS}
    unexpected = sorted(set(tensors) - expected_keys)
    if unexpected:
        key = unexpected[0]
        path, _, suffix = key.rpartition(".")
        if suffix in _LAYER_SUFFIXES and path not in layers:
            raise ValueError(f"{source}: '{key}' has no matching '{path}.lora_A' (missing key).")
        raise ValueError(f"{source}: key '{key}' does not belong to a file with gating {gating!r} and K={experts}.")
    architecture = {k: v for k, v in metadata.items() if k not in ("format", "version", "experts", "rank", "gating")}
    return TDLoRA(source, experts, MappingProxyType(layers), shared, gating, MappingProxyType(architecture))


def load_td_lora_file(path: str | os.PathLike) -> TDLoRA:
    tensors, metadata = read_safetensors(path, f"TD-LoRA file {os.path.basename(path)}", part=FORMAT)
    return parse_td_lora(tensors, metadata, os.fspath(path))


def random_td_lora(
    shapes: Mapping[str, tuple[int, int]],
    experts: int,
    rank: int,
    *,
    per_layer_gates: bool = False,
    gate_hidden: int = 32,
    embed_dim: int = 64,
    scale: float = 0.05,
    seed: int = 0,
) -> tuple[dict[str, ExpertLayer], GateWeights | None]:
    """Random experts (and gates) for the layers in `shapes` (path -> (out, in)); for tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * std

    def gate() -> GateWeights:  # logits of order 1: soft gates that still move with sigma
        return GateWeights(
            randn(gate_hidden, embed_dim, std=2 / math.sqrt(embed_dim)),
            randn(gate_hidden, std=0.5),
            randn(experts, gate_hidden, std=2 / math.sqrt(gate_hidden)),
            randn(experts, std=0.5),
        )

    layers = {
        path: ExpertLayer(
            randn(experts, rank, in_features, std=1 / math.sqrt(in_features)),
            randn(experts, out_features, rank, std=scale),
            float(rank),
            gate() if per_layer_gates and experts > 1 else None,
        )
        for path, (out_features, in_features) in shapes.items()
    }
    return layers, (gate() if experts > 1 and not per_layer_gates else None)
