"""Small but real ComfyUI Chroma models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded Chroma checkpoint: the host's model detection reads the keys of a checkpoint
of this size (the modulation network's norms make it Chroma) and fills every model parameter it knows; the size
fields detection cannot know (it assumes Chroma's 3072 / 24 heads and a 5120-wide, 5-layer modulation network) are
set from `TinyChroma`. The latent is Flux.1's (16 channels, patch 2); the text is T5's, with no pooled vector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class TinyChroma:
    hidden_size: int = 128
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2
    context_dim: int = 64
    modulation_hidden: int = 64  # the modulation network's width (Chroma: 5120)
    modulation_layers: int = 2  # its residual MLP layers (Chroma: 5)
    seed: int = 0

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Chroma checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {
            "img_in.weight": empty(d, LATENT_CHANNELS * 4),
            "txt_in.weight": empty(d, self.context_dim),
            "distilled_guidance_layer.norms.0.scale": empty(self.modulation_hidden),
        }
        for i in range(self.depth):
            keys[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = empty(d // self.num_heads)
        for i in range(self.depth_single_blocks):
            keys[f"single_blocks.{i}.norm.key_norm.scale"] = empty(d // self.num_heads)
        return keys

    def size_fields(self) -> dict:
        head_dim = self.hidden_size // self.num_heads
        third = head_dim // 8 * 3  # Flux.1's 3-axis split (16, 56, 56 of 128) scaled to the head
        return {"num_heads": self.num_heads, "axes_dim": [head_dim - 2 * third, third, third],
                "out_dim": self.hidden_size, "hidden_dim": self.modulation_hidden, "n_layers": self.modulation_layers}


def build_model(config: TinyChroma = TinyChroma(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI Chroma model of the given size, with deterministic random weights."""
    return detected_model_patcher(config.checkpoint_skeleton(), config.size_fields(), "chroma", "Chroma", dtype, config.seed)


def conditioning(config: TinyChroma = TinyChroma(), text_tokens: int = 8, seed: int = 0):
    """Positive and negative conditioning in ComfyUI's format (random T5 embeddings; Chroma has no pooled vector)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        return [[torch.randn(1, text_tokens, config.context_dim, generator=generator), {"pooled_output": None}]]

    return one(), one()


def latent(height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, height, width)
