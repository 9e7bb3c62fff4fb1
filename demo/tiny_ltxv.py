"""Small but real ComfyUI LTX-Video (0.9) models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded LTX-Video checkpoint: the host's model detection reads the keys of a checkpoint
(the depth from the blocks, the cross-attention width from the first block) and fills the model parameters; the sizes it
fixes for the real model (32 heads of 64, T5-XXL's 4096 caption channels) are set small here. The latent is LTX-Video's
own: 128 channels, frames x rows x columns of 8 x 32 x 32 video pixels each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 128


@dataclass(frozen=True)
class TinyLTXV:
    num_heads: int = 4
    head_dim: int = 32
    depth: int = 3
    caption_channels: int = 64
    seed: int = 0

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of an LTX-Video checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {"adaln_single.emb.timestep_embedder.linear_1.bias": empty(d)}
        for i in range(self.depth):
            keys[f"transformer_blocks.{i}.attn2.to_k.weight"] = empty(d, d)
        return keys


def build_model(config: TinyLTXV = TinyLTXV(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI LTX-Video model of the given size, with deterministic random weights."""
    sizes = {"num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim,
             "caption_channels": config.caption_channels, "cross_attention_dim": config.hidden_size}
    return detected_model_patcher(config.checkpoint_skeleton(), sizes, "ltxv", "LTX-Video", dtype, config.seed)


def conditioning(config: TinyLTXV = TinyLTXV(), text_tokens: int = 8, seed: int = 0):
    """Positive and negative conditioning in ComfyUI's format: random T5-like text embeddings with the attention mask
    the LTX-Video text encoder gives them, and LTXVConditioning's frame rate."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        text = torch.randn(1, text_tokens, config.caption_channels, generator=generator)
        return [[text, {"attention_mask": torch.ones(1, text_tokens, dtype=torch.long), "frame_rate": 25}]]

    return one(), one()


def latent(frames: int = 2, height: int = 4, width: int = 6, batch: int = 1) -> torch.Tensor:
    """An empty LTX-Video latent: `frames` latent frames (8 video frames each, the first alone) of `height` x `width`."""
    return torch.zeros(batch, LATENT_CHANNELS, frames, height, width)
