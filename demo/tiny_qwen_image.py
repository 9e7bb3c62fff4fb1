"""Small but real ComfyUI Qwen-Image models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded Qwen-Image checkpoint: the host's model detection reads the keys of a checkpoint
of this size (`txt_norm` makes it Qwen-Image; `__index_timestep_zero__` makes it Edit 2511 on hosts that know it) and
fills what it knows (latent channels, depth, the reference method); the sizes it cannot know (it assumes 24 heads of
128, a 3584-wide text encoder) are set from `TinyQwenImage`. The latent is Wan 2.1's: 16 channels, one frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class TinyQwenImage:
    hidden_size: int = 128
    num_heads: int = 2
    depth: int = 3
    context_dim: int = 64
    edit_2511: bool = False  # reference tokens modulated at timestep 0 (0.12.1 and newer)
    seed: int = 0

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Qwen-Image checkpoint of this size (what detection reads)."""
        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {"img_in.weight": empty(self.hidden_size, LATENT_CHANNELS * 4), "txt_norm.weight": empty(self.context_dim)}
        for i in range(self.depth):
            keys[f"transformer_blocks.{i}.img_mod.1.weight"] = empty(6 * self.hidden_size, self.hidden_size)
        if self.edit_2511:
            keys["__index_timestep_zero__"] = empty(0)
        return keys

    def size_fields(self) -> dict:
        head_dim = self.hidden_size // self.num_heads
        third = head_dim // 8 * 3  # the 3-axis RoPE split (16, 56, 56 of 128) scaled to the head
        return {"num_attention_heads": self.num_heads, "attention_head_dim": head_dim, "joint_attention_dim": self.context_dim,
                "axes_dims_rope": (head_dim - 2 * third, third, third)}


def build_model(config: TinyQwenImage = TinyQwenImage(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI Qwen-Image model of the given size, with deterministic random weights."""
    return detected_model_patcher(config.checkpoint_skeleton(), config.size_fields(), "qwen_image", "Qwen-Image", dtype, config.seed)


def conditioning(config: TinyQwenImage = TinyQwenImage(), text_tokens: int = 8, seed: int = 0, reference: torch.Tensor | None = None):
    """Positive and negative conditioning in ComfyUI's format (random text embeddings, no pooled vector); with
    `reference` (a latent), the reference latent an Edit prompt carries (as TextEncodeQwenImageEdit gives it)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        extra = {"pooled_output": None, **({"reference_latents": [reference]} if reference is not None else {})}
        return [[torch.randn(1, text_tokens, config.context_dim, generator=generator), extra]]

    return one(), one()


def latent(height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, 1, height, width)
