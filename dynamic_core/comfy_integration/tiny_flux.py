"""Small but real ComfyUI Flux models, built programmatically, for tests, the demo and the benchmark.

Stock checkpoints cannot be this small (ComfyUI's Flux detection fixes 24 heads x 128), so the model
is built from a unet_config through `comfy.supported_models.Flux`, exactly the class ComfyUI uses
for a loaded Flux.1 checkpoint, and wrapped in a ModelPatcher.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sample
import comfy.supported_models


@dataclass(frozen=True)
class TinyFlux:
    hidden_size: int = 256
    num_heads: int = 4
    depth: int = 2
    depth_single_blocks: int = 4
    context_dim: int = 64
    vec_dim: int = 32
    in_channels: int = 16
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def axes_dim(self) -> list[int]:
        """RoPE split like Flux.1 (16/56/56 of 128): about 1/8 for the index axis, the rest for y and x."""
        first = max(2, (self.head_dim // 8) // 2 * 2)
        rest = self.head_dim - first
        y = rest // 2 // 2 * 2
        return [first, y, rest - y]

    def unet_config(self) -> dict:
        return dict(
            image_model="flux",
            in_channels=self.in_channels,
            out_channels=self.in_channels,
            vec_in_dim=self.vec_dim,
            context_in_dim=self.context_dim,
            hidden_size=self.hidden_size,
            mlp_ratio=self.mlp_ratio,
            num_heads=self.num_heads,
            depth=self.depth,
            depth_single_blocks=self.depth_single_blocks,
            axes_dim=self.axes_dim(),
            theta=10000,
            patch_size=2,
            qkv_bias=True,
            guidance_embed=self.guidance_embed,
        )


def initialise(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights: scaled normal linears, unit norm scales, small modulation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("scale"):  # RMSNorm / QK-norm
                value = torch.ones(param.shape)
            elif param.ndim == 2:
                std = 1.0 / math.sqrt(param.shape[1])
                if "mod" in name or "adaLN" in name:
                    std *= 0.25
                value = torch.randn(param.shape, generator=generator) * std
            else:
                value = torch.randn(param.shape, generator=generator) * 0.02
            param.copy_(value.to(param.dtype))


def build_model(config: TinyFlux = TinyFlux(), dtype: torch.dtype = torch.float32, state_dict: dict | None = None):
    """A ModelPatcher around a real ComfyUI Flux model of the given size."""
    model_config = comfy.supported_models.Flux(config.unet_config())
    model_config.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    model = model_config.get_model({})
    if state_dict is None:
        initialise(model.diffusion_model, config.seed)
    else:
        model.diffusion_model.load_state_dict(state_dict)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=comfy.model_management.unet_offload_device())


def conditioning(config: TinyFlux = TinyFlux(), text_tokens: int = 8, seed: int = 0, guidance: float = 3.5):
    """Positive and negative conditioning in ComfyUI's format, with random text embeddings."""
    generator = torch.Generator().manual_seed(seed)

    def one(extra: dict) -> list:
        context = torch.randn(1, text_tokens, config.context_dim, generator=generator)
        pooled = torch.randn(1, config.vec_dim, generator=generator)
        return [[context, {"pooled_output": pooled, **extra}]]

    return one({"guidance": guidance}), one({"guidance": guidance})


def sample(
    model,
    positive,
    negative,
    *,
    height: int = 32,
    width: int = 32,
    batch: int = 1,
    steps: int = 4,
    cfg: float = 2.0,
    sampler: str = "euler",
    scheduler: str = "simple",
    seed: int = 0,
    denoise: float = 1.0,
    start_step: int | None = None,
    last_step: int | None = None,
    latent: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
) -> torch.Tensor:
    """One ComfyUI sampling run (as KSampler / KSamplerAdvanced do it) on a latent of the given size."""
    channels = model.model.latent_format.latent_channels
    if latent is None:
        latent = torch.zeros(batch, channels, height, width)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model,
        noise,
        steps,
        cfg,
        sampler,
        scheduler,
        positive,
        negative,
        latent,
        denoise=denoise,
        start_step=start_step,
        last_step=last_step,
        sigmas=sigmas,
        disable_pbar=True,
        seed=seed,
    )


def block_arguments(
    diffusion_model, kind: str, batch: int, text_tokens: int, grid: tuple[int, int], seed: int = 0
) -> dict:
    """Random but realistic `patches_replace["dit"]` arguments for one Flux block: streams, vec, RoPE of a
    `grid` of image tokens after `text_tokens` text tokens ("double": img and txt, "single": the joint img)."""
    generator = torch.Generator().manual_seed(seed)
    d = diffusion_model.hidden_size
    image_tokens = grid[0] * grid[1]
    img_ids = torch.zeros(grid[0], grid[1], 3)
    img_ids[..., 1] = torch.arange(grid[0])[:, None]
    img_ids[..., 2] = torch.arange(grid[1])[None, :]
    ids = torch.cat((torch.zeros(batch, text_tokens, 3), img_ids.reshape(1, image_tokens, 3).expand(batch, -1, -1)), dim=1)
    args = {
        "vec": torch.randn(batch, d, generator=generator),
        "pe": diffusion_model.pe_embedder(ids),
        "attn_mask": None,
        "transformer_options": {},
    }
    if kind == "double":
        args["img"] = torch.randn(batch, image_tokens, d, generator=generator)
        args["txt"] = torch.randn(batch, text_tokens, d, generator=generator)
    else:
        args["img"] = torch.randn(batch, text_tokens + image_tokens, d, generator=generator)
    return args


def describe(config: TinyFlux) -> str:
    return ", ".join(f"{k}={v}" for k, v in asdict(config).items())
