"""Small but real ComfyUI Z-Image models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded Z-Image checkpoint: the host's model detection reads the keys of a checkpoint
(`cap_embedder.1` makes it the Lumina family, its width the caption encoder's) and fills what it knows for a model of
any width (patch 2, 16 latent channels, depth, q/k norms). Detection recognises Z-Image by its 3840 width only, so the
Z-Image settings it would fill at that width (z-image modulation, time scale 1000, padding to 32 tokens, equal q and
kv heads, 8/3 SwiGLU) are set here with the small sizes. The latent is Flux.1's (16 channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class TinyZImage:
    hidden_size: int = 256  # at least the 256-wide modulation input: the host sizes it min(D, 256) and the timestep
    num_heads: int = 4      # embedder's output 256, so a narrower model does not run
    depth: int = 3
    refiner_depth: int = 1
    context_dim: int = 64
    seed: int = 0

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Z-Image checkpoint of this size (what detection reads)."""
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {"cap_embedder.1.weight": empty(self.hidden_size, self.context_dim), "cap_pad_token": empty(1, self.hidden_size)}
        for i in range(self.depth):
            keys[f"layers.{i}.attention.qkv.weight"] = empty(3 * self.hidden_size, self.hidden_size)
        return keys

    def size_fields(self) -> dict:
        head_dim = self.hidden_size // self.num_heads
        third = head_dim // 8 * 3
        return {"n_heads": self.num_heads, "n_kv_heads": self.num_heads, "axes_dims": [head_dim - 2 * third, third, third],
                "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 32,
                "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32, "n_refiner_layers": self.refiner_depth}


def build_model(config: TinyZImage = TinyZImage(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI Z-Image model of the given size, with deterministic random weights."""
    return detected_model_patcher(config.checkpoint_skeleton(), config.size_fields(), "lumina2", "Z-Image", dtype, config.seed)


def conditioning(config: TinyZImage = TinyZImage(), text_tokens: int = 8, seed: int = 0):
    """Positive and negative conditioning in ComfyUI's format (random caption features of Qwen3's layout, no pooled
    vector)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        return [[torch.randn(1, text_tokens, config.context_dim, generator=generator), {"pooled_output": None}]]

    return one(), one()


def latent(height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, height, width)
