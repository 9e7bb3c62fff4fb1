"""Model adapters, one file per family, and the lookup that picks one for a loaded model."""
from __future__ import annotations

import torch

from .base import BlockInternals, BlockRef, BlockWork, CallShape, ModelAdapter, TokenLayout, UnsupportedModelError
from .flux import FluxAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (FluxAdapter,)


def supported_families() -> str:
    return "; ".join(f"{a.display_name} ({', '.join(a.supported_variants)})" for a in ADAPTERS)


def adapter_for(diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> ModelAdapter:
    """The adapter for this model, or UnsupportedModelError naming what is supported."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.claims(diffusion_model):
            return adapter_cls(diffusion_model, host_model_name)
    described = host_model_name or type(diffusion_model).__name__
    raise UnsupportedModelError(
        f"Dynamic DiT does not support the model family '{described}' "
        f"({type(diffusion_model).__module__}). Supported: {supported_families()}."
    )


__all__ = [
    "ADAPTERS",
    "BlockInternals",
    "BlockRef",
    "BlockWork",
    "CallShape",
    "ModelAdapter",
    "TokenLayout",
    "UnsupportedModelError",
    "adapter_for",
    "supported_families",
]
