"""Dynamic methods, one file each, registered with the executor by their settings' name."""
from __future__ import annotations

from .base import REGISTRY, DynamicMethod, register
from . import td_lora  # noqa: F401  (importing registers the method)
from . import token_router  # noqa: F401  (registers the Token Router)
from . import width  # noqa: F401  (registers the Dynamic Width Patcher)
from . import patch_scheduler  # noqa: F401  (registers the Dynamic Patch Scheduler)

__all__ = ["REGISTRY", "DynamicMethod", "register"]
