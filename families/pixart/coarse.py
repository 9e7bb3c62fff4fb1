"""Coarse patch grids for PixArt-Σ as ComfyUI runs it (see `../coarse.py` for the seam): training-free only.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ..base import BlockRef
from ..capabilities import ModelInfo
from ..coarse import CoarseCall, PositionedCoarseGrid, PositionRewrite

if TYPE_CHECKING:
    from .adapter import PixArtArchitecture


class PixArtCoarseGrid(PositionedCoarseGrid):
    prediction = "noise"
    family_label = "PixArt-Σ"
    time_argument = "timesteps"
    no_trained_reason = ("PixArt has no post-input patch point: coarse steps on PixArt run training-free, without a "
                         "trained embedding")

    def __init__(self, arch: "PixArtArchitecture", blocks: tuple[BlockRef, ...], info: ModelInfo,
                 diffusion_model: torch.nn.Module) -> None:
        super().__init__(arch, blocks, info)
        self._pe = (diffusion_model.pe_interpolation, diffusion_model.pe_precision)
        host = inspect.getmodule(type(diffusion_model))
        self._host_positions = host.get_2d_sincos_pos_embed_torch  # the forward's own
        self._sincos = host.get_1d_sincos_pos_embed_from_grid_torch

    def refusal(self, arguments: Mapping[str, Any], diffusion_model: torch.nn.Module) -> str | None:
        if arguments.get("control") is not None or (arguments.get("kwargs") or {}).get("control") is not None:
            return "ControlNet residuals are laid out per native token"
        return None

    def factor_refusal(self, arguments: Mapping[str, Any], factor: int) -> str | None:
        size = factor * self.native_patch
        height, width = (-(-int(s) // size) * self.native_patch for s in arguments["x"].shape[-2:])
        if 0 in self._scale(height, width):
            return f"a {factor}x coarser latent ({height}x{width}) is below the smallest the host positions (c_res 48)"
        return None

    def sampling_refusal(self, model_sampling: Any) -> str | None:
        """The coarse arithmetic assumes noise prediction (EPS): denoised = input - sigma * output."""
        if model_sampling is None:
            return None
        probe = model_sampling.calculate_denoised(torch.tensor([2.0]), torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 5.0))
        if abs(float(probe.flatten()[0]) - 3.0) > 1e-6:
            return "the model sampling does not predict noise (EPS), as PixArt-Σ's does"
        return None

    def _scale(self, height: int, width: int) -> tuple[float, int]:
        """(pe_interpolation, base_size) as the host's forward derives them from a latent's size."""
        c_res = (height + width) // 2
        interpolation, precision = self._pe
        if interpolation is None or precision is not None:
            interpolation = round(c_res / (512 / 8.0), precision or 0)
        return interpolation, (round(c_res / 64) * 64) // self.native_patch

    def centre_embeddings(self, call: CoarseCall, device: Any, dtype: torch.dtype) -> torch.Tensor:
        """(1, rows * cols, D): the native grid's sin-cos embedding at each coarse token's region centre."""
        f, p = call.factor, self.native_patch
        interpolation, base = self._scale(*call.native_size)
        native_rows, native_cols = (s // p for s in call.native_size)
        rows, cols = (s // p for s in call.coarse_size)
        centre = lambda count, native: (f * torch.arange(count, dtype=torch.float32, device=device) + (f - 1) / 2) / (
            native / base) / interpolation
        grid_h, grid_w = torch.meshgrid(centre(rows, native_rows), centre(cols, native_cols), indexing="ij")
        half = self.arch.hidden_size // 2
        embedding = torch.cat([self._sincos(half, grid_w, device=device), self._sincos(half, grid_h, device=device)], dim=1)
        return embedding.unsqueeze(0).to(dtype)

    def centred_positions(self, own: Callable[[torch.Tensor], torch.Tensor], call: CoarseCall, x: torch.Tensor) -> torch.Tensor:
        tokens = own(x)
        height, width = x.shape[-2:]
        interpolation, base = self._scale(height, width)
        host = self._host_positions(self.arch.hidden_size, h=height // self.native_patch, w=width // self.native_patch,
                                    pe_interpolation=interpolation, base_size=base, device=x.device, dtype=x.dtype)
        return tokens + (self.centre_embeddings(call, x.device, torch.float32) - host.unsqueeze(0).float()).to(tokens.dtype)

    def position_points(self) -> Mapping[str, PositionRewrite]:
        return {"x_embedder.forward": self.centred_positions}
