"""Save Conditioning for Dynamic DiT Benchmark: a prompt's conditioning as a file for the command-line benchmark (a developer node)."""
from __future__ import annotations

from comfy_api.latest import io

from ..integration.node_schema import node_schema
from .conditioning_file import save_conditioning_to_output


class DynamicBenchmarkConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicBenchmarkConditioning", "Save Conditioning for Dynamic DiT Benchmark", "dynamic_dit/report",
            "Saves a prompt's conditioning (text embedding, pooled output, Flux guidance) to ComfyUI's output "
            "folder, for the command-line benchmark on your own checkpoint: python -m "
            "devtools.bench --model flux1-dev.safetensors --positive <this file> --vae ae.safetensors",
            [
                io.Conditioning.Input("conditioning", tooltip="From CLIP Text Encode (and Flux Guidance, if you use it)."),
                io.String.Input("filename_prefix", default="dynamic_dit_bench/prompt",
                                tooltip="Path under ComfyUI's output folder; a counter and .safetensors are added."),
            ],
            output_node=True, developer=True,
        )

    @classmethod
    def execute(cls, conditioning, filename_prefix) -> io.NodeOutput:
        path = save_conditioning_to_output(conditioning, filename_prefix)
        return io.NodeOutput(ui={"text": [str(path)]})


NODE_CLASS_MAPPINGS = {"DynamicBenchmarkConditioning": DynamicBenchmarkConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicBenchmarkConditioning": "Save Conditioning for Dynamic DiT Benchmark"}
