"""The pack's ComfyUI nodes: thin declarations over dynamic_core."""
from __future__ import annotations

from . import bench_conditioning, patch_scheduler, reference, report, td_lora, telemetry, token_router, train, trained, width

_MODULES = (telemetry, report, width, token_router, td_lora, patch_scheduler, trained, bench_conditioning, reference, train)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
