"""The Flux.1 family (dev, schnell, Fill, Kontext) as ComfyUI builds it: the adapter (`adapter.py`),
its blocks run reduced and measured (`blocks.py`), token routing (`routing.py`), width units
(`width.py`) and coarse patch grids (`coarse.py`)."""
from .adapter import DOUBLE, FLUX_BLOCK_KINDS, SINGLE, FluxAdapter, FluxArchitecture

__all__ = ["DOUBLE", "FLUX_BLOCK_KINDS", "SINGLE", "FluxAdapter", "FluxArchitecture"]
