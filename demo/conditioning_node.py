"""Save Conditioning for Benchmark: a prompt's conditioning as a file for the command-line benchmark."""
from __future__ import annotations

from .conditioning_file import save_conditioning_to_output


class DynamicBenchmarkConditioning:
    DESCRIPTION = (
        "Saves a prompt's conditioning (text embedding, pooled output, Flux guidance) to ComfyUI's output "
        "folder, for the command-line benchmark on your own checkpoint: python -m "
        "devtools.bench --model flux1-dev.safetensors --positive <this file> --vae ae.safetensors"
    )
    CATEGORY = "dynamic_dit/report"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "From CLIP Text Encode (and Flux Guidance, if you use it)."}),
                "filename_prefix": ("STRING", {"default": "dynamic_dit_bench/prompt",
                                               "tooltip": "Path under ComfyUI's output folder; a counter and .safetensors are added."}),
            }
        }

    def save(self, conditioning, filename_prefix):
        path = save_conditioning_to_output(conditioning, filename_prefix)
        return {"ui": {"text": [str(path)]}}


NODE_CLASS_MAPPINGS = {"DynamicBenchmarkConditioning": DynamicBenchmarkConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicBenchmarkConditioning": "Save Conditioning for Benchmark"}
