"""Load Trained Dynamic DiT: every part of a training run's file, applied as it was trained, from one node."""
from __future__ import annotations

from comfy_api.latest import io

from ..integration.node_schema import SPEED_WORDS, node_schema
from ..integration.patching import model_file_path, training_run_files
from ..integration.trained_files import apply_trained_files


NO_FILE = "none"


class DynamicTrainedLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicTrainedLoader", "Load Trained Dynamic DiT", "dynamic_dit/methods",
            "Applies every part a Train Dynamic DiT file holds, each as it was trained: the width router with its TD-LoRA "
            "experts, token routers with their keep ratios, or the coarse-patch embedding on its schedule. One node instead "
            "of chaining the Width Patcher, the TD-LoRA Loader, the Token Router and the Patch Scheduler by hand. The file "
            "must have been trained on this model's weights.",
            [
                io.Model.Input("model", tooltip="The model the file was trained on (from Load Diffusion Model or a LoRA loader)."),
                io.Combo.Input("file", options=[NO_FILE, *training_run_files()], default=NO_FILE,
                               tooltip="A file the Train node wrote to models/dynamic_dit/; none leaves the model as it is."),
            ],
            [io.Model.Output()],
            search_aliases=["trained", "load trained", "distilled", "router file", *SPEED_WORDS],
        )

    @classmethod
    def execute(cls, model, file) -> io.NodeOutput:
        if file == NO_FILE:
            return io.NodeOutput(model)
        return io.NodeOutput(apply_trained_files(model, [model_file_path(file)]))


NODE_CLASS_MAPPINGS = {"DynamicTrainedLoader": DynamicTrainedLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTrainedLoader": "Load Trained Dynamic DiT"}
