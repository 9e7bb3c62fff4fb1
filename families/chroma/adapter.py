"""Adapter for Chroma (ComfyUI's `Chroma`, comfy/ldm/chroma/model.py, 0.3.75 and 0.12.1).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from typing import Any

import torch

from ...core.flops import FlopBreakdown, linear_flops
from ..capabilities import CallLayout
from ..base import class_path
from ..flux.adapter import FLUX2_BLOCK_KINDS, FluxAdapter
from .coarse import ChromaCoarseGrid
from .width import ChromaWidthUnits

MODULATION_ROWS = 344  # the host's `mod_index_length`: rows the approximator runs per call, whatever the depth


class ChromaAdapter(FluxAdapter):
    family = "chroma"
    display_name = "Chroma"
    supported_variants = ("Chroma (HD, Flash and the other Flux-shaped Chroma checkpoints)",)
    block_kinds = FLUX2_BLOCK_KINDS  # the blocks have no modulation layers of their own
    _width_class = ChromaWidthUnits

    @classmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        return type(diffusion_model).__module__.startswith("comfy.ldm.chroma")

    def _check_variant(self, diffusion_model: torch.nn.Module, host_model_name: str | None) -> Any:
        if type(diffusion_model).__name__ == "ChromaRadiance":
            self._refuse("Chroma Radiance (pixel-space Chroma with a NeRF-style decoder head)")
        if class_path(diffusion_model) != "comfy.ldm.chroma.model.Chroma":
            self._refuse(f"an unknown Chroma relative ({class_path(diffusion_model)})")
        params = getattr(diffusion_model, "params", None)
        approximator = getattr(diffusion_model, "distilled_guidance_layer", None)
        if params is None or approximator is None:
            self._refuse("a Chroma model without its parameters or modulation network")
        if host_model_name is not None and host_model_name != "Chroma":
            self._refuse(f"the Chroma-based '{host_model_name}' model type")
        hidden_dim, in_dim = self._shape(approximator.in_proj, "distilled_guidance_layer.in_proj")
        out_dim, _ = self._shape(approximator.out_proj, "distilled_guidance_layer.out_proj")
        if out_dim != int(params.hidden_size):
            self._refuse("a Chroma model whose modulation network does not give hidden-size vectors")
        self._approximator = (in_dim, hidden_dim, len(approximator.layers), out_dim)
        return params

    def _modulation_is_shared(self, params: Any) -> bool:
        return True  # the modulation network's rows, handed to each block as `vec`

    def coarse_grid(self) -> ChromaCoarseGrid:
        return ChromaCoarseGrid(self.arch, self._blocks, self._info)

    def stem_flops(self, shape: CallLayout) -> FlopBreakdown:
        a, b = self.arch, shape.batch
        d = a.hidden_size
        in_dim, hidden_dim, layers, out_dim = self._approximator
        rows = b * MODULATION_ROWS
        embed = linear_flops(b * shape.image_tokens, a.latent_channels * a.patch_size**2, d)
        embed += linear_flops(b * shape.text_tokens, a.context_dim, d)
        embed += linear_flops(rows, in_dim, hidden_dim) + layers * 2 * linear_flops(rows, hidden_dim, hidden_dim)
        embed += linear_flops(rows, hidden_dim, out_dim)
        final = linear_flops(b * shape.image_tokens, d, a.out_channels * a.patch_size**2)
        return FlopBreakdown(embed=embed, final=final)
