"""The dynamic methods, one package each (settings, runtime, file format, trainable part, node).

Importing this package registers every method's runtime with the executor's registry (`core.method`).
"""
from __future__ import annotations

from ..core.method import REGISTRY, DynamicMethod, register
from . import patch_scheduler, td_lora, token_router, width  # noqa: F401  (importing registers each method)

__all__ = ["REGISTRY", "DynamicMethod", "register"]
