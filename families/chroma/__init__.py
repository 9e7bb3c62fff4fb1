"""Chroma as ComfyUI builds it (`comfy/ldm/chroma`): Flux.1's block classes without their modulation layers, a
distilled modulation network in their place. The Flux adapter's blocks, routing and width units run it; this
package says what differs (`adapter.py`: variant, stem FLOPs, `coarse.py`: training-free coarse grids; `width.py`: timestep features)."""
from .adapter import ChromaAdapter

__all__ = ["ChromaAdapter"]
