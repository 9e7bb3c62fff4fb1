"""Fidelity of a case's images against full compute: PSNR, SSIM, and ComfyUI's latent preview."""
from __future__ import annotations

import math
from typing import Callable

# --- fidelity ------------------------------------------------------------------------------------
def psnr(reference, other, peak: float = 1.0) -> float:
    """PSNR in dB of images in [0, peak] (infinite when identical), pooled over the whole batch."""
    mse = float(((reference.double() - other.double()) ** 2).mean())
    if mse == 0:
        return math.inf
    return 10 * math.log10(peak**2 / mse)


def ssim(reference, other, peak: float = 1.0) -> float:
    """Mean SSIM of (B, C, H, W) images (Gaussian window sigma 1.5, 11 px; Wang et al. 2004 constants).

    Matches scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`:
    statistics per channel with reflected borders, averaged over the interior.
    """
    import torch
    import torch.nn.functional as F

    x, y = reference.double(), other.double()
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"SSIM needs two (B, C, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    radius, sigma = 5, 1.5
    if min(x.shape[-2:]) < 2 * radius + 1:
        raise ValueError(f"SSIM needs images of at least {2 * radius + 1} px, got {tuple(x.shape[-2:])}")
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.device)
    channels = x.shape[1]

    def blur(t):
        t = F.pad(t, (radius, radius, radius, radius), mode="reflect")
        t = F.conv2d(t, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(t, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s[..., radius:-radius, radius:-radius].mean())


def latent_preview(latent_format) -> Callable:
    """ComfyUI's own linear latent -> RGB preview of a latent format (no VAE): approximate images."""
    import torch

    factors = torch.tensor(latent_format.latent_rgb_factors, dtype=torch.float32)  # (C, 3)
    bias = getattr(latent_format, "latent_rgb_factors_bias", None)
    bias = torch.tensor(bias, dtype=torch.float32) if bias is not None else torch.zeros(3)

    def to_image(latent):
        x = latent_format.process_in(latent.float())
        rgb = torch.einsum("bchw,cr->brhw", x, factors) + bias.view(1, 3, 1, 1)
        return ((rgb + 1) / 2).clamp(0, 1)

    return to_image
