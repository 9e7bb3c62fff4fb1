"""Dynamic DiT: ComfyUI nodes that make Diffusion Transformers faster with dynamic compute."""
from .dynamic_core.comfy_integration.patching import register_model_folder
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

register_model_folder()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
