"""Small but real ComfyUI Wan video models, built programmatically, for tests and the benchmark.

Built the way ComfyUI builds a loaded Wan checkpoint: the host's model detection reads the keys of a
checkpoint of this size (which variant: T2V, I2V with CLIP image tokens, 2.2 TI2V 5B with 48 latent
channels) and fills the model parameters, the few size fields detection cannot know are set from
`TinyWan` (detection assumes 128-channel heads), and the host's own model class is built and wrapped
in a ModelPatcher. Latents have 4n + 1 frames, as Wan's VAE makes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import comfy.model_management
import comfy.model_patcher

from .reference import detected_model_config, frozen_as_the_host_leaves_it, initialise


@dataclass(frozen=True)
class TinyWan:
    hidden_size: int = 128
    num_heads: int = 4
    depth: int = 3
    ffn_dim: int = 256
    text_dim: int = 48
    freq_dim: int = 64
    variant: str = "t2v"  # "t2v", "i2v" (CLIP image tokens, 16 + 20 input channels) or "ti2v_5b" (Wan 2.2 5B: 48 channels)
    seed: int = 0

    @property
    def out_channels(self) -> int:
        return 48 if self.variant == "ti2v_5b" else 16

    @property
    def in_channels(self) -> int:
        return 36 if self.variant == "i2v" else self.out_channels

    def checkpoint_skeleton(self) -> dict[str, torch.Tensor]:
        """Shape-only tensors under the key names of a Wan checkpoint of this size (what detection reads)."""
        d = self.hidden_size

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, device="meta")

        keys = {
            "head.modulation": empty(1, 2, d),
            "head.head.weight": empty(self.out_channels * 4, d),
            "patch_embedding.weight": empty(d, self.in_channels, 1, 2, 2),
        }
        for i in range(self.depth):
            keys[f"blocks.{i}.ffn.0.weight"] = empty(self.ffn_dim, d)
        if self.variant == "i2v":
            keys["img_emb.proj.0.bias"] = empty(1280)
        return keys

    def size_fields(self) -> dict[str, Any]:
        """The model fields this config decides; the host's own model detection fills every other one."""
        return dict(num_heads=self.num_heads, text_dim=self.text_dim, freq_dim=self.freq_dim)


def host_model_config(config: TinyWan, dtype: torch.dtype = torch.float32):
    """The host's own model config (`comfy.supported_models`) for a Wan model of this size."""
    model_config = detected_model_config(config.checkpoint_skeleton(), config.size_fields(), "wan2.1", "Wan")
    model_config.set_inference_dtype(dtype, None)
    return model_config


def build_model(config: TinyWan = TinyWan(), dtype: torch.dtype = torch.float32, state_dict: dict | None = None):
    """A ModelPatcher around a real ComfyUI Wan model of the given size (random weights unless `state_dict`)."""
    model_config = host_model_config(config, dtype)
    model = model_config.get_model({})
    diffusion_model = model.diffusion_model
    if state_dict is None:
        initialise(diffusion_model, config.seed)
    else:
        diffusion_model.load_state_dict(state_dict)
    frozen_as_the_host_leaves_it(diffusion_model)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=comfy.model_management.unet_offload_device())


def conditioning(config: TinyWan = TinyWan(), text_tokens: int = 12, seed: int = 0, image_tokens: int = 257):
    """Positive and negative conditioning in ComfyUI's format: random text embeddings, and for I2V random
    CLIP vision tokens (as CLIPVisionEncode + WanImageToVideo give them: `clip_vision_output`)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> list:
        options: dict[str, Any] = {}
        if config.variant == "i2v":
            options["clip_vision_output"] = _ClipVisionOutput(torch.randn(1, image_tokens, 1280, generator=generator))
        return [[torch.randn(1, text_tokens, config.text_dim, generator=generator), options]]

    return one(), one()


@dataclass
class _ClipVisionOutput:
    """What WAN21.extra_conds reads of a CLIP vision output."""

    penultimate_hidden_states: torch.Tensor


def latent(config: TinyWan, video_frames: int = 9, height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    """An empty latent for a video of `video_frames` frames (4n + 1, as Wan takes them: its VAE makes them
    n + 1 latent frames, the first alone, then four per latent frame); `height`, `width` in latent pixels."""
    if video_frames % 4 != 1:
        raise ValueError(f"Wan videos have 4n + 1 frames, got {video_frames}")
    return torch.zeros(batch, config.out_channels, (video_frames - 1) // 4 + 1, height, width)
