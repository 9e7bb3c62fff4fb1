"""Small but real ComfyUI Flux models for tests, the demo and the benchmark: random conditioning, one sampling run
as KSampler does it (for any model), and realistic block arguments; the models are built by `reference.py`.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

import comfy.sample

from .reference import TinyFlux


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
