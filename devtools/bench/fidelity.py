"""Fidelity of a case's images against full compute: PSNR, SSIM, and ComfyUI's latent preview."""
from __future__ import annotations

from typing import Callable


def latent_preview(latent_format) -> Callable:
    """ComfyUI's own linear latent -> RGB preview of a latent format (no VAE): approximate images. A video
    latent (B, C, T, H, W) becomes one image per sample with its T frames side by side."""
    import torch

    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = getattr(latent_format, "latent_rgb_factors_bias", None)
    bias = torch.tensor(bias, dtype=torch.float32) if bias is not None else torch.zeros(3)

    def to_image(latent):
        x = latent_format.process_in(latent.float())
        if x.ndim == 5:  # frames side by side: (B, C, T, H, W) -> (B, C, H, T * W)
            b, c, t, h, w = x.shape
            x = x.permute(0, 1, 3, 2, 4).reshape(b, c, h, t * w)
        rgb = torch.einsum("bchw,cr->brhw", x, factors) + bias.view(1, 3, 1, 1)
        return ((rgb + 1) / 2).clamp(0, 1)

    return to_image
