"""TD-LoRA Loader: a timestep-gated mixture of LoRA experts (DyDiT++), or a plain LoRA, as an in-place bypass."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ...integration.node_schema import node_schema
from ...integration.patching import check_base_weights
from ...integration.trained_files import TrainedFileKind, register_trained_file
from .comfy_files import apply_td_lora, file_choices, load_td_lora, path_of, read_file
from .file import FORMAT, load_td_lora_file
from .settings import STRENGTH_RANGE


_read_cache: dict[str, tuple] = {}  # "last": ((path, mtime, size), (tensors, metadata)): the last file read


def _read(path: str) -> tuple:
    """The file's tensors and metadata, read again only when the file changed (a V3 node keeps no state of its own)."""
    stat = os.stat(path)
    key = (path, stat.st_mtime, stat.st_size)
    cached = _read_cache.get("last")
    if cached is None or cached[0] != key:
        cached = _read_cache["last"] = (key, read_file(path))
    return cached[1]


class DynamicTDLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        low, high = STRENGTH_RANGE
        return node_schema(
            "DynamicTDLoRALoader", "Dynamic TD-LoRA Loader", "dynamic_dit/methods",
            "Applies a TD-LoRA: several low-rank experts whose mix follows the noise level, so noisy and clean "
            "steps get different adaptations. Plain LoRA files (any key style ComfyUI's LoRA loader reads) load "
            "as a single expert. The adaptation runs as a bypass next to each layer, so it keeps working under the "
            "Dynamic Width Patcher and the Token Router; ComfyUI's own LoRA loaders can be chained before or after. "
            "Applying this node again replaces its earlier TD-LoRA (use ComfyUI's LoRA loader to stack plain LoRAs). "
            "The Dynamic Speed Report shows the gate weights of every step.",
            [
                io.Model.Input("model", tooltip="The model to add the TD-LoRA to (after the Width Patcher when the file came with a width router)."),
                io.Combo.Input("file", options=file_choices(),
                               tooltip="A TD-LoRA from models/dynamic_dit/ or any LoRA from models/loras/ (read as one expert)."),
                io.Float.Input("strength", default=1.0, min=low, max=high, step=0.01,
                               tooltip="Scales the whole adaptation; 0 leaves the model exactly as it was."),
            ],
            [io.Model.Output()],
            search_aliases=["DyDiT++", "timestep LoRA", "mixture of LoRA experts", "LoRA", "TD-LoRA"],
        )

    @classmethod
    def execute(cls, model, file: str, strength: float) -> io.NodeOutput:
        tensors, metadata = _read(path_of(file))
        lora = load_td_lora(model, tensors, metadata, file)
        check_base_weights(model, metadata, f"TD-LoRA file '{file}'")  # trained files name their base
        return io.NodeOutput(apply_td_lora(model, lora, strength))


# A trained run's TD-LoRA; the loader above also reads any LoRA of models/loras/, so it reads files its own way.
register_trained_file(TrainedFileKind(
    part="td_lora", format=FORMAT, label="TD-LoRA file", load=lambda path, name: load_td_lora_file(path),
    as_trained=lambda model, lora, header: apply_td_lora(model, lora, 1.0),
))

NODE_CLASS_MAPPINGS = {"DynamicTDLoRALoader": DynamicTDLoRALoader}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicTDLoRALoader": "Dynamic TD-LoRA Loader"}
