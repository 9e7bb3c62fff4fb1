"""How close an image stays to full compute's: PSNR and SSIM of images in [0, peak] (the report and the benchmark)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
