"""The Wan 2.1 / 2.2 video family (T2V, I2V / FLF2V, 2.2 A14B high- and low-noise experts, 2.2 TI2V 5B)
as ComfyUI builds it: the adapter (`adapter.py`), its blocks run reduced (`blocks.py`), token routing
over the video tokens (`routing.py`), width units (`width.py`) and training-free coarse grids (`coarse.py`)."""
from .adapter import BLOCK, WanAdapter, WanArchitecture

__all__ = ["BLOCK", "WanAdapter", "WanArchitecture"]
