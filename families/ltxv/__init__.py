"""LTX-Video 0.9 (`LTXVModel`, comfy/ldm/lightricks): the adapter, its block views and its token routing."""
from .adapter import LTXVAdapter

__all__ = ["LTXVAdapter"]
