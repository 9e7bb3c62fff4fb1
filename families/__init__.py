"""Model adapters, one package per family, and the lookup that picks one for a loaded model."""
from __future__ import annotations

import torch

from .base import BlockInternals, BlockKind, BlockRef, BlockWork, ModelAdapter, UnsupportedModelError, block_linear_index
from .capabilities import CallLayout, MlpTokenGate, ModelInfo, TokenRouting, WidthUnits
from .chroma import ChromaAdapter
from .flux import FluxAdapter
from .known_families import plain_name
from .ltxv import LTXVAdapter
from .pixart import PixArtAdapter
from .qwen_image import QwenImageAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter
from .z_image import ZImageAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (FluxAdapter, ChromaAdapter, QwenImageAdapter, ZImageAdapter, SD3Adapter, PixArtAdapter,
                                           WanAdapter, LTXVAdapter)


def supported_families() -> str:
    return "; ".join(f"{a.display_name} ({', '.join(a.supported_variants)})" for a in ADAPTERS)


def adapter_for(diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> ModelAdapter:
    """The adapter for this model, or UnsupportedModelError naming the model and what is supported."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.claims(diffusion_model, host_model_name):
            return adapter_cls(diffusion_model, host_model_name)
    name = plain_name(host_model_name, type(diffusion_model))
    if name is None:  # a family this pack has no name for: say what the host calls it
        described = host_model_name or type(diffusion_model).__name__
        name = f"the model family '{described}' ({type(diffusion_model).__module__})"
    raise UnsupportedModelError(f"Dynamic DiT does not support {name} models. Supported: {supported_families()}.")


__all__ = [
    "ADAPTERS",
    "BlockInternals",
    "BlockKind",
    "BlockRef",
    "BlockWork",
    "CallLayout",
    "ModelAdapter",
    "ModelInfo",
    "MlpTokenGate",
    "TokenRouting",
    "UnsupportedModelError",
    "block_linear_index",
    "WidthUnits",
    "adapter_for",
    "supported_families",
]
