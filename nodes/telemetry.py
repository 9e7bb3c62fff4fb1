"""Dynamic Telemetry: the executor with every method off, for a full-compute baseline with numbers."""
from __future__ import annotations

from comfy_api.latest import io

from ..integration.node_schema import node_schema
from ..integration.patching import install_executor


class DynamicTelemetry(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicTelemetry", "Dynamic Telemetry", "dynamic_dit/report",
            "Records per-step FLOPs and model time of this model without changing its output. Sample the same "
            "seed through it and through your Dynamic DiT nodes, and feed both to 'Dynamic Speed Report'.",
            [io.Model.Input("model", tooltip="The model whose runs are measured at full compute: the baseline the Speed Report compares with.")],
            [io.Model.Output()],
            search_aliases=["baseline", "full compute", "measure", "telemetry"],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(install_executor(model))


NODE_CLASS_MAPPINGS = {"DynamicTelemetry": DynamicTelemetry}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTelemetry": "Dynamic Telemetry"}
