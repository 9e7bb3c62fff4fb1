"""Qwen-Image (and its Edit versions) as ComfyUI builds it (`comfy/ldm/qwen_image`): the adapter (`adapter.py`), its
blocks run reduced (`blocks.py`), token routing (`routing.py`) and width units (`width.py`)."""
from .adapter import QwenImageAdapter

__all__ = ["QwenImageAdapter"]
