"""Files the node tests put in the model folder."""
from __future__ import annotations

import types

from comfyui_dynamic_dit.families import adapter_for
from comfyui_dynamic_dit.methods.patch_scheduler.file import derived_layers, save_patch_embedding_file


def write_flux_embedding(folder, model_patcher, name: str = "coarse.safetensors") -> str:
    """A coarse-patch embedding file (2x and 4x) derived from a Flux.1 model's own patch embedding and final linear."""
    dm = model_patcher.model.diffusion_model
    layers = {f: derived_layers(dm.img_in.weight, dm.img_in.bias, dm.final_layer.linear.weight, dm.final_layer.linear.bias, 2, f)
              for f in (2, 4)}
    save_patch_embedding_file(folder / name, adapter_for(dm, "Flux").coarse_grid().file_fields(), layers)
    return name


def node_outputs(node_class, *args, hidden: dict | None = None, **kwargs):
    """A node run as ComfyUI's executor runs a V3 node (`execute` on a copy of the class that holds the prompt's
    `hidden` values, e.g. unique_id), its outputs as a tuple, or, for a node that shows something on the canvas, as
    {"ui": ..., "result": ...} (what the frontend receives and the outputs)."""
    if hidden:
        node_class = type(node_class.__name__, (node_class,), {"hidden": types.SimpleNamespace(**hidden)})
    output = node_class.execute(*args, **kwargs)
    result = output.result if output.result is not None else ()
    return result if output.ui is None else {"ui": output.ui, "result": result}


def combo_options(spec) -> list:
    """The choices of a combo input's declaration: a V3 node declares ("COMBO", {"options": [...]}), a V1 one ([...], {})."""
    return list(spec[1]["options"]) if spec[0] == "COMBO" else list(spec[0])
