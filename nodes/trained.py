"""Load Trained Dynamic DiT: every part of a training run's file, applied as it was trained, from one node."""
from __future__ import annotations

from ..integration.patching import model_file_path, training_run_files
from ..integration.trained_files import apply_trained_files

NO_FILE = "none"


class DynamicTrainedLoader:
    DESCRIPTION = (
        "Applies every part a Train Dynamic DiT file holds, each as it was trained: the width router with its TD-LoRA "
        "experts, token routers with their keep ratios, or the coarse-patch embedding on its schedule. One node instead "
        "of chaining the Width Patcher, the TD-LoRA Loader, the Token Router and the Patch Scheduler by hand. The file "
        "must have been trained on this model's weights."
    )
    CATEGORY = "dynamic_dit/methods"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the file was trained on (from Load Diffusion Model or a LoRA loader)."}),
                "file": ([NO_FILE, *training_run_files()], {
                    "default": NO_FILE,
                    "tooltip": "A file the Train node wrote to models/dynamic_dit/; none leaves the model as it is.",
                }),
            }
        }

    def load(self, model, file):
        if file == NO_FILE:
            return (model,)
        return (apply_trained_files(model, [model_file_path(file)]),)


NODE_CLASS_MAPPINGS = {"DynamicTrainedLoader": DynamicTrainedLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTrainedLoader": "Load Trained Dynamic DiT"}
