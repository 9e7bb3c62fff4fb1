"""Dynamic methods, one file each, registered with the executor by their settings' name."""
from __future__ import annotations

from .base import REGISTRY, DynamicMethod, register
from . import width  # noqa: E402,F401  (registers the method)

__all__ = ["REGISTRY", "DynamicMethod", "register"]
