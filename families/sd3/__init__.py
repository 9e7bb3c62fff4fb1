"""SD3 / SD3.5 (MMDiT, MMDiT-X) as ComfyUI builds it (`OpenAISignatureMMDITWrapper`, comfy/ldm/modules/diffusionmodules/
mmdit.py): the adapter (`adapter.py`), its blocks run reduced (`blocks.py`), token routing (`routing.py`) and width
units (`width.py`)."""
from .adapter import SD3Adapter

__all__ = ["SD3Adapter"]
