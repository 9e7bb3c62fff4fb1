"""Small but real ComfyUI Flux 2 models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded Flux 2 checkpoint: the host's model detection reads the keys of a checkpoint
of this size (its shared modulation layers make it Flux 2; `guidance_in` makes it the guidance-distilled dev, its
absence Klein) and fills every model parameter it knows (4-axis RoPE, SwiGLU, no biases, `txt_ids_dims` on newer
hosts); the few size fields detection cannot know are set from `TinyFlux2` (detection assumes 128-channel heads).
The latent has Flux 2's 128 channels, one token per latent pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 128


@dataclass(frozen=True)
class TinyFlux2:
    hidden_size: int = 128
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2
    context_dim: int = 64
    guidance: bool = True  # Flux 2 dev; False: Klein
    seed: int = 0

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Flux 2 checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {
            "img_in.weight": empty(d, LATENT_CHANNELS),
            "txt_in.weight": empty(d, self.context_dim),
            "double_stream_modulation_img.lin.weight": empty(6 * d, d),
        }
        for i in range(self.depth):
            keys[f"double_blocks.{i}.img_attn.norm.key_norm.scale"] = empty(d // self.num_heads)
        for i in range(self.depth_single_blocks):
            keys[f"single_blocks.{i}.norm.key_norm.scale"] = empty(d // self.num_heads)
        if self.guidance:
            keys["guidance_in.in_layer.weight"] = empty(d, 256)
        return keys

    def size_fields(self) -> dict:
        head_dim = self.hidden_size // self.num_heads
        return {"num_heads": self.num_heads, "axes_dim": [head_dim // 4] * 4}


def build_model(config: TinyFlux2 = TinyFlux2(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI Flux 2 model of the given size, with deterministic random weights."""
    return detected_model_patcher(config.checkpoint_skeleton(), config.size_fields(), "flux2", "Flux 2", dtype, config.seed)


def conditioning(config: TinyFlux2 = TinyFlux2(), text_tokens: int = 8, seed: int = 0, guidance: float = 4.0):
    """Positive and negative conditioning in ComfyUI's format (random text embeddings; Flux 2 has no pooled vector)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        extra = {"pooled_output": None, **({"guidance": guidance} if config.guidance else {})}  # as its text encoder gives them
        return [[torch.randn(1, text_tokens, config.context_dim, generator=generator), extra]]

    return one(), one()


def latent(height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, height, width)
