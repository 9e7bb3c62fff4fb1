"""Plain-PyTorch core of the Dynamic DiT node pack.

Nothing here imports ComfyUI except `comfy_integration`, the one module that installs the executor
on a ComfyUI ModelPatcher.
"""
from .adapters import BlockRef, BlockWork, CallShape, ModelAdapter, UnsupportedModelError, adapter_for
from .flops import FlopBreakdown, measure_flops
from .plan import DynamicPlan, MethodSettings
from .telemetry import CallRecord, RunRecord, TelemetrySink

__all__ = [
    "BlockRef",
    "BlockWork",
    "CallRecord",
    "CallShape",
    "DynamicPlan",
    "FlopBreakdown",
    "MethodSettings",
    "ModelAdapter",
    "RunRecord",
    "TelemetrySink",
    "UnsupportedModelError",
    "adapter_for",
    "measure_flops",
]
