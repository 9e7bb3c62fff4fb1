"""The arithmetic of a coarse model call (DDiT), shared by the Patch Scheduler's trained path and the trainer,
so that a trained file computes at inference exactly what the student computed in training.

Names: x the call's latent, t its flow time, f the coarse factor, p the model's patch, P = f p, D area
downsampling by f, U bilinear upsampling by f, c = 1 - t + t/f and t' = (t/f)/c the coarse noise level
(see docs/methods/patch_scheduler.md for the derivation).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ...core.flops import linear_flops
from .file import CoarseLayers

if TYPE_CHECKING:
    from ...families.coarse import CoarseGrid


def coarse_time(t: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale c, coarse flow time t') of the area-downsampled latent: D x_t = c ((1 - t') D x0 + t' noise)."""
    scale = 1.0 - t + t / factor
    return scale, (t / factor) / scale


def coarse_grid_size(grid: "CoarseGrid", x: torch.Tensor, factor: int) -> tuple[int, int]:
    """Rows and columns of coarse tokens for latent x (its H and W padded up to multiples of P)."""
    size = factor * grid.native_patch
    return -(-x.shape[-2] // size), -(-x.shape[-1] // size)


def coarse_placeholder(grid: "CoarseGrid", x: torch.Tensor, factor: int) -> torch.Tensor:
    """The zero latent of the coarse grid's size that the host embeds (and the post-input patch replaces)."""
    rows, cols = coarse_grid_size(grid, x, factor)
    return x.new_zeros(*x.shape[:-2], rows * grid.native_patch, cols * grid.native_patch)


def coarse_tokens(grid: "CoarseGrid", x: torch.Tensor, layers: CoarseLayers, factor: int,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained embedding of the f*p patches of x / c (the noisy channels brought to the coarse noise level,
    as the training-free path does), plus the patch-size identifier, (B, rows * cols, D); and the zero
    placeholder latent of the coarse grid's size that the host embeds and the post-input patch replaces."""
    size = factor * grid.native_patch
    scale, _ = coarse_time(t, factor)
    z = x.clone()
    z[:, :grid.noisy_channels] = x[:, :grid.noisy_channels] / per_row(scale, x).to(x.dtype)
    tokens = F.linear(grid.patchify(pad_to_multiple(z, size), size), layers.embed_weight, layers.embed_bias) + layers.patch_id
    return tokens, coarse_placeholder(grid, x, factor)


def coarse_output(grid: "CoarseGrid", diffusion_model: torch.nn.Module, hidden: torch.Tensor, conditioning: Any,
                  layers: CoarseLayers, x: torch.Tensor, factor: int, t: torch.Tensor) -> torch.Tensor:
    """The native-resolution velocity of a trained coarse call (float32) from the last block's image tokens.

    The host's final layer (its norm and modulation) runs once with two last linears side by side: its own,
    giving the coarse model's velocity v_c on the coarse grid, and the trained de-embedding, giving a P x P
    correction R. As the training-free path, v = (x - U x0_c) / t with x0_c = D x / c - t' (v_c + ...):
        v = (x - U D x / c) / t + (t' / t) (U v_c + R)
    with U bilinear upsampling; a zero de-embedding is the training-free path exactly."""
    native = grid.native_linears(diffusion_model)[1]
    split = native.weight.shape[0]

    def both(h: torch.Tensor) -> torch.Tensor:
        return torch.cat((native(h), F.linear(h, layers.deembed_weight.to(h.dtype), layers.deembed_bias.to(h.dtype))), dim=-1)

    out = grid.final_layer(diffusion_model, hidden, conditioning, both)
    size, patch = factor * grid.native_patch, grid.native_patch
    rows, cols = coarse_grid_size(grid, x, factor)
    velocity = grid.unpatchify(out[..., :split], rows, cols, patch).float()
    upsampled = crop_like(F.interpolate(velocity, scale_factor=factor, mode="bilinear", align_corners=False), x)
    correction = crop_like(grid.unpatchify(out[..., split:], rows, cols, size), x).float()
    scale, t_coarse = coarse_time(t.float(), factor)
    noisy = x[:, :grid.noisy_channels].float()
    smooth = crop_like(F.interpolate(
        F.avg_pool2d(pad_to_multiple(noisy, size), factor), scale_factor=factor, mode="bilinear", align_corners=False
    ), x)
    return (noisy - smooth / per_row(scale, x)) / per_row(t, x) + per_row(t_coarse / t.float(), x) * (upsampled + correction)


def coarse_layer_flops(grid: "CoarseGrid", x: torch.Tensor, layers: CoarseLayers, factor: int) -> float:
    """FLOPs of a trained coarse call's own layers: the embedding, the final layer run again on the captured
    tokens (modulation, the host's own last linear and the de-embedding)."""
    size = factor * grid.native_patch
    rows, cols = coarse_grid_size(grid, x, factor)
    count, batch = rows * cols, x.shape[0]
    hidden, outputs = layers.deembed_weight.shape[1], layers.deembed_weight.shape[0]
    return (linear_flops(batch * count, x.shape[1] * size * size, layers.embed_weight.shape[0])
            + linear_flops(batch * count, hidden, outputs) + linear_flops(batch * count, hidden, outputs // factor**2)
            + grid.final_modulation_flops(batch))


def upsampled(y: torch.Tensor, factor: int, like: torch.Tensor) -> torch.Tensor:
    """U: bilinear upsampling by `factor` of an image or video latent, cropped to `like`'s size."""
    return crop_like(spatially(lambda v: F.interpolate(v, scale_factor=factor, mode="bilinear", align_corners=False), y), like)


class FlowStep:
    """A training-free coarse call of a flow-matching model (x = (1 - t) x0 + t n, the model predicts v = n - x0 at
    time t; CONST: the model's input is the sampler's x): D x is brought to the coarse noise level t' (`coarse_time`)
    and the native velocity taken against the full-resolution input, v = (x - U x0_c) / t."""

    def __init__(self, grid: "CoarseGrid", arguments: dict, model_sampling: Any) -> None:
        self.grid, self.arguments, self.t = grid, arguments, grid.flow_time(arguments)

    def coarse(self, low: torch.Tensor, factor: int) -> tuple[torch.Tensor, dict]:
        """The coarse call's latent from D x, and its time."""
        scale, self.t_coarse = coarse_time(self.t, factor)
        z = low.clone()
        z[:, :self.grid.noisy_channels] = low[:, :self.grid.noisy_channels] / per_row(scale, low)
        return z, self.grid.with_flow_time(self.arguments, self.t_coarse)

    def native(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor, factor: int) -> torch.Tensor:
        noisy = self.grid.noisy_channels
        denoised = z[:, :noisy] - per_row(self.t_coarse, x) * out.float()
        return ((x[:, :noisy].float() - upsampled(denoised, factor, x)) / per_row(self.t, x)).to(out.dtype)


class NoiseStep:
    """A training-free coarse call of a noise-predicting model on a discrete schedule (EPS: the sampler's x_s = x0 +
    sigma n, the model's input x_s / sqrt(sigma^2 + sigma_data^2), its output n). Averaging f x f latent pixels averages
    f^2 independent noises: D x_s = D x0 + (sigma / f) n', a sample at sigma' = sigma / f with nothing to rescale. The
    model runs at the host's timestep for sigma', and the native noise is taken against the full-resolution input,
    n = (x_s - U x0_c) / sigma. The host's own model sampling does every conversion."""

    def __init__(self, grid: "CoarseGrid", arguments: dict, model_sampling: Any) -> None:
        self.grid, self.arguments, self.sampling = grid, arguments, model_sampling
        timestep = arguments[grid.time_argument]
        self.sigma = model_sampling.sigma(timestep).float()

    def _sampler_x(self, x: torch.Tensor) -> torch.Tensor:
        """x_s from the model's input: calculate_input scales by a per-row factor, read off a ones tensor."""
        return x.float() / self.sampling.calculate_input(per_row(self.sigma, x), torch.ones_like(x[:, :1], dtype=torch.float32))

    def coarse(self, low: torch.Tensor, factor: int) -> tuple[torch.Tensor, dict]:
        self.sigma_coarse = self.sigma / factor
        self.low = self._sampler_x(low)  # D x_s (D commutes with the per-row scale)
        z = self.sampling.calculate_input(per_row(self.sigma_coarse, low), self.low)
        timestep = self.arguments[self.grid.time_argument]
        return z, {self.grid.time_argument: self.sampling.timestep(self.sigma_coarse).to(timestep.dtype)}

    def native(self, x: torch.Tensor, z: torch.Tensor, out: torch.Tensor, factor: int) -> torch.Tensor:
        noisy = self.grid.noisy_channels
        denoised = self.sampling.calculate_denoised(per_row(self.sigma_coarse, x), out.float(), self.low)[:, :noisy]
        x_s = self._sampler_x(x)[:, :noisy]
        return ((x_s - upsampled(denoised, factor, x)) / per_row(self.sigma, x)).to(out.dtype)


def per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) t broadcast over a latent of `like`'s rank (image (B, C, H, W) or video (B, C, T, H, W))."""
    return t.float().reshape(-1, *([1] * (like.ndim - 1)))


def as_image(x: torch.Tensor) -> torch.Tensor:
    """A video latent (B, C, T, H, W) as an image latent (B, C * T, H, W): every frame's channels are
    channels of one image, so spatial statistics and resampling act on each frame alone."""
    return x if x.ndim == 4 else x.flatten(1, -3)


def spatially(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """`fn` (a 2-D spatial op on (B, C, H, W)) applied to an image or video latent, frames kept apart."""
    if x.ndim == 4:
        return fn(x)
    out = fn(as_image(x))
    return out.reshape(*x.shape[:-2], *out.shape[-2:])


def pad_to_multiple(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad H and W up to multiples of `size` by repeating the edge pixels (a coarse patch must be whole)."""
    pad_h, pad_w = -x.shape[-2] % size, -x.shape[-1] % size
    if not pad_h and not pad_w:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def crop_like(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y[..., : like.shape[-2], : like.shape[-1]]


__all__ = ["FlowStep", "NoiseStep", "as_image", "coarse_grid_size", "coarse_layer_flops", "coarse_output", "coarse_placeholder", "coarse_time",
           "coarse_tokens", "crop_like", "pad_to_multiple", "per_row", "spatially", "upsampled"]
