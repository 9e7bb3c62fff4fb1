"""A TD-LoRA bound to a model: its layers matched to the host's block linears (by path), and their shapes."""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import torch

from ...families import BlockRef, ModelAdapter, block_linear_index
from .experts import LowRankLayer, TDLoRA


def architecture_metadata(adapter: ModelAdapter) -> dict[str, str]:
    """The metadata a TD-LoRA file for this model carries (and must match on load)."""
    return adapter.model_info().header()


def block_linear_shapes(adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear a TD-LoRA can gate, by module path (what a trainer adapts)."""
    shapes = linear_shapes(diffusion_model)
    return {path: shapes[path] for path in block_linear_index(adapter, diffusion_model)}


def linear_shapes(diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every module with a 2-D weight, by module path."""
    shapes = {}
    for path, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            shapes[path] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


@dataclass(frozen=True)
class BoundLayers:
    """A TD-LoRA resolved against one model: bypasses per block, and K = 1 layers outside the blocks."""

    blocks: Mapping[BlockRef, Mapping[str, LowRankLayer]]
    outside: Mapping[str, LowRankLayer]


def bind_layers(lora: TDLoRA, adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> BoundLayers:
    """Check `lora` against the model (architecture, layer names, shapes); raise ValueError naming the key."""
    if lora.architecture is not None:
        expected = architecture_metadata(adapter)
        for key, value in expected.items():
            found = lora.architecture.get(key)
            if found is None:
                raise ValueError(f"{lora.source}: the metadata has no '{key}' (a TD-LoRA file must name the model it was made for).")
            if str(found) != value:
                raise ValueError(
                    f"{lora.source}: made for another model: metadata '{key}' is {found!r}, this {adapter.display_name} model "
                    f"has {value!r} ({', '.join(f'{k}={v}' for k, v in expected.items())})."
                )
    index = block_linear_index(adapter, diffusion_model)
    shapes = linear_shapes(diffusion_model)
    blocks: dict[BlockRef, dict[str, LowRankLayer]] = {}
    outside: dict[str, LowRankLayer] = {}
    for path, layer in lora.layers.items():
        if path not in shapes:
            raise ValueError(
                f"{lora.source}: '{path}' names no linear layer of this {adapter.display_name} model "
                f"({adapter.display_name} layers look like '{next(iter(index), '?')}'). Is the file for another model?"
            )
        out_features, in_features = shapes[path]
        if (layer.out_features, layer.in_features) != (out_features, in_features):
            raise ValueError(
                f"{lora.source}: '{path}' adapts a {layer.in_features} -> {layer.out_features} layer, but this model's "
                f"'{path}' is {in_features} -> {out_features} (lora_A needs {in_features} columns, lora_B {out_features} rows)."
            )
        if path in index:
            block, name, _ = index[path]
            blocks.setdefault(block, {})[name] = layer
        elif layer.experts > 1:
            raise ValueError(
                f"{lora.source}: '{path}' is outside the transformer blocks and has K={layer.experts} experts. Layers outside "
                f"the blocks are merged once into the weights, which only a plain LoRA (K = 1) allows."
            )
        else:
            outside[path] = layer
    return BoundLayers(
        MappingProxyType({b: MappingProxyType(v) for b, v in blocks.items()}), MappingProxyType(outside)
    )
