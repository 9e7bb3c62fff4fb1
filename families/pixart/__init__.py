"""PixArt-Σ: `adapter.py` (what the host model is, its emulated block patch point, FLOPs), `blocks.py` (reduced block
views), `width.py` (heads and MLP groups), `routing.py` (image-token subsets), `coarse.py` (training-free coarse steps)."""
from .adapter import PixArtAdapter

__all__ = ["PixArtAdapter"]
