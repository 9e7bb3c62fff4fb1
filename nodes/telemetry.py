"""Dynamic Telemetry: the executor with every method off, for a full-compute baseline with numbers."""
from __future__ import annotations

from ..integration.patching import install_executor


class DynamicTelemetry:
    DESCRIPTION = (
        "Records per-step FLOPs and model time of this model without changing its output. Sample the same "
        "seed through it and through your Dynamic DiT nodes, and feed both to 'Dynamic Speed Report'."
    )
    CATEGORY = "dynamic_dit/report"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The model whose runs are measured at full compute: the baseline the Speed Report compares with."})}}

    def patch(self, model):
        return (install_executor(model),)


NODE_CLASS_MAPPINGS = {"DynamicTelemetry": DynamicTelemetry}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTelemetry": "Dynamic Telemetry"}
