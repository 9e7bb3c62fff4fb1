"""Z-Image (Turbo and base) as ComfyUI builds it (`NextDiT` with Z-Image's modulation, comfy/ldm/lumina): the adapter
(`adapter.py`), its blocks run reduced (`blocks.py`), token routing (`routing.py`), width units (`width.py`) and the
training-free coarse grid (`coarse.py`). Its blocks have no host patch point: the pack emulates one on their forward."""
from .adapter import ZImageAdapter

__all__ = ["ZImageAdapter"]
