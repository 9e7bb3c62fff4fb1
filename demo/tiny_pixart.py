"""Small but real ComfyUI PixArt-Σ models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded PixArt checkpoint: the host's model detection reads the keys of a checkpoint and
fills what it derives from them (PixArt-Σ, not α: no aspect-ratio embedder; the depth from the blocks; patch 2, 4
latent channels, the predicted variance); the widths it fixes for the real model (1152, 16 heads, T5-XXL's 4096) are
set small here. The latent is SDXL's (4 channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TinyPixArt:
    hidden_size: int = 128
    num_heads: int = 2
    depth: int = 3
    caption_channels: int = 64
    seed: int = 0

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a PixArt-Σ checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {"t_block.1.weight": empty(6 * d, d), "y_embedder.y_proj.fc1.weight": empty(d, self.caption_channels)}
        for i in range(self.depth):
            keys[f"blocks.{i}.attn.qkv.weight"] = empty(3 * d, d)
        return keys


def build_model(config: TinyPixArt = TinyPixArt(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI PixArt-Σ model of the given size, with deterministic random weights."""
    sizes = {"hidden_size": config.hidden_size, "num_heads": config.num_heads, "caption_channels": config.caption_channels}
    return detected_model_patcher(config.checkpoint_skeleton(), sizes, "pixart_sigma", "PixArt-Σ", dtype, config.seed)


def conditioning(config: TinyPixArt = TinyPixArt(), text_tokens: int = 8, seed: int = 0):
    """Positive and negative conditioning in ComfyUI's format (random T5-like text embeddings)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        return [[torch.randn(1, text_tokens, config.caption_channels, generator=generator), {}]]

    return one(), one()


def latent(height: int = 48, width: int = 96, batch: int = 1) -> torch.Tensor:
    """The host sizes its position embeddings by round((H + W) / 2 / 64) latent pixels and divides by it: below an average
    side of 48 that is 0 and the forward fails. 48 x 96 (384 x 768 px) is the smallest whose 2x coarse grid (24 x 48,
    round(36 / 64) = 1) the host still positions."""
    return torch.zeros(batch, LATENT_CHANNELS, height, width)
