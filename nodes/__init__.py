"""The pack's ComfyUI nodes, on the V3 schema: each method's node (methods/<name>/node.py), the demo's, and the nodes that are
no one method's (telemetry, speed report, trainer, trained-file loader)."""
from __future__ import annotations

from ..demo import conditioning_node as bench_conditioning, reference_node as reference
from ..methods.patch_scheduler import node as patch_scheduler
from . import report, telemetry, train, trained
from ..methods.td_lora import node as td_lora
from ..methods.token_router import node as token_router
from ..methods.width import node as width


_MODULES = (telemetry, report, width, token_router, td_lora, patch_scheduler, trained, bench_conditioning, reference, train)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in _MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
