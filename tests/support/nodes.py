"""Files the node tests put in the model folder."""
from __future__ import annotations

from comfyui_dynamic_dit.families import adapter_for
from comfyui_dynamic_dit.methods.patch_scheduler.file import derived_layers, save_patch_embedding_file


def write_flux_embedding(folder, model_patcher, name: str = "coarse.safetensors") -> str:
    """A coarse-patch embedding file (2x and 4x) derived from a Flux.1 model's own patch embedding and final linear."""
    dm = model_patcher.model.diffusion_model
    layers = {f: derived_layers(dm.img_in.weight, dm.img_in.bias, dm.final_layer.linear.weight, dm.final_layer.linear.bias, 2, f)
              for f in (2, 4)}
    save_patch_embedding_file(folder / name, adapter_for(dm, "Flux").coarse_grid().file_fields(), layers)
    return name
