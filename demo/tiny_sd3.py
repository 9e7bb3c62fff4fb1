"""Small but real ComfyUI SD3 / SD3.5 models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded SD3 checkpoint: the host's model detection reads the keys of a checkpoint of this
size and fills every model parameter it derives from them (depth and width from the patch embedding: 64 channels and
one head per block, patch size, latent channels, pooled and text widths, the position-embedding grid, RMS q/k norms,
SD3.5 Medium's MMDiT-X layers). The latent is SD3's (16 channels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import detected_model_patcher

LATENT_CHANNELS = 16


@dataclass(frozen=True)
class TinySD3:
    depth: int = 3  # the host makes the width 64 * depth with depth heads, and as many blocks
    blocks: int | None = None  # fewer blocks than `depth` (a proxy at a real model's width)
    mmdit_x_layers: tuple[int, ...] = (0, 1)  # SD3.5 Medium's blocks with a second image self-attention
    context_dim: int = 64
    pooled_dim: int = 64
    position_grid: int = 16  # the position embedding's grid side (SD3: 192)
    seed: int = 0

    @property
    def hidden_size(self) -> int:
        return 64 * self.depth

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of an SD3 checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {
            "x_embedder.proj.weight": empty(d, LATENT_CHANNELS, 2, 2),
            "final_layer.linear.weight": empty(4 * LATENT_CHANNELS, d),
            "y_embedder.mlp.0.weight": empty(d, self.pooled_dim),
            "context_embedder.weight": empty(d, self.context_dim),
            "pos_embed": empty(1, self.position_grid**2, d),
            "joint_blocks.0.context_block.attn.qkv.weight": empty(3 * d, d),
            "joint_blocks.0.context_block.attn.ln_q.weight": empty(64),
        }
        for i in self.mmdit_x_layers:
            keys[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = empty(3 * d, d)
        return keys


def build_model(config: TinySD3 = TinySD3(), dtype: torch.dtype = torch.float32):
    """A ModelPatcher around a real ComfyUI SD3 model of the given size, with deterministic random weights."""
    sizes = {} if config.blocks is None else {"num_blocks": config.blocks}
    patcher = detected_model_patcher(config.checkpoint_skeleton(), sizes, None, "SD3", dtype, config.seed)
    with torch.no_grad():  # a buffer the host allocates empty and fills from the checkpoint: deterministic values here
        embed = patcher.model.diffusion_model.pos_embed
        embed.copy_(torch.randn(embed.shape, generator=torch.Generator().manual_seed(config.seed)).to(embed) * 0.1)
    return patcher


def conditioning(config: TinySD3 = TinySD3(), text_tokens: int = 8, seed: int = 0):
    """Positive and negative conditioning in ComfyUI's format (random text embeddings and pooled vectors)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        return [[torch.randn(1, text_tokens, config.context_dim, generator=generator),
                 {"pooled_output": torch.randn(1, config.pooled_dim, generator=generator)}]]

    return one(), one()


def latent(height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.zeros(batch, LATENT_CHANNELS, height, width)
