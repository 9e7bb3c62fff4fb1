"""Dynamic methods, one file each, registered with the executor by their settings' name."""
from __future__ import annotations

from .base import REGISTRY, DynamicMethod, register

__all__ = ["REGISTRY", "DynamicMethod", "register"]
