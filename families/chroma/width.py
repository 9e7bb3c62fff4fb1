"""Chroma's width units: Flux's heads and MLP groups, with Chroma's own call arguments and timestep features."""
from __future__ import annotations

import inspect
from typing import Any

import torch

from ..flux.width import FluxWidthUnits


class ChromaWidthUnits(FluxWidthUnits):
    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        # Chroma's forward needs a guidance tensor; the host passes 0 when the conditioning has none (its model_base)
        arguments = super().neutral_arguments(latent, timestep, text_tokens, guidance)
        arguments["guidance"] = torch.zeros(latent.shape[0], device=latent.device, dtype=torch.float32)
        return arguments

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The modulation network's first row (single block 0's shift) at guidance 0: what the timestep alone makes
        # of the model's modulations, through the host's own embedding function and network.
        embedding = inspect.getmodule(type(diffusion_model)).timestep_embedding
        index = torch.zeros_like(timestep)
        row = torch.cat((embedding(timestep, 16), embedding(index, 16), embedding(index, 32)), dim=-1)
        return diffusion_model.distilled_guidance_layer(row.to(dtype))
