"""Dynamic DiT: ComfyUI nodes that make Diffusion Transformers faster with dynamic compute."""
if __package__:  # loaded as a package, the way ComfyUI loads a custom node folder
    from .integration.patching import register_model_folder
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    register_model_folder()
else:  # read as a lone file, e.g. by pytest in a checkout folder whose name is no Python identifier
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

# The frontend extension (web/js/dynamic_dit.js), served at /extensions/<pack folder>/js/. Registered
# here only: a `web` entry in pyproject's [tool.comfy] would register the same folder a second time
# under the project name, and the frontend would load the extension twice.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
