"""Each file input lists only the files of its kind from models/dynamic_dit/ (TD-LoRA also loras/)."""
import pytest
import torch
from safetensors.torch import save_file

import folder_paths

from comfyui_dynamic_dit.integration.patching import MODEL_FOLDER
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import combo_options

KINDS = {
    "width_router.safetensors": "dynamic_dit.width_router",
    "token_router.safetensors": "dynamic_dit.token_router",
    "coarse_patches.safetensors": "dynamic_dit.patch_embedding",
    "experts.safetensors": "td_lora",
    "reference.safetensors": "dynamic_dit.reference_flux",
}


@pytest.fixture
def model_folders(tmp_path, monkeypatch):
    dynamic_dit, loras = tmp_path / "dynamic_dit", tmp_path / "loras"
    dynamic_dit.mkdir()
    loras.mkdir()
    for name, file_format in KINDS.items():
        save_file({"x": torch.zeros(2)}, str(dynamic_dit / name), metadata={"format": file_format, "version": "1"})
    save_file({"x": torch.zeros(2)}, str(dynamic_dit / "no_metadata.safetensors"))
    (dynamic_dit / "damaged.safetensors").write_bytes(b"\xff" * 64)
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, str(loras / "style.safetensors"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, MODEL_FOLDER, ([str(dynamic_dit)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    return dynamic_dit


def _choices(node: str, name: str) -> list[str]:
    return combo_options(NODE_CLASS_MAPPINGS[node].INPUT_TYPES()["required"][name])


def test_each_file_input_lists_only_its_kind(model_folders):
    assert _choices("DynamicWidthPatcher", "router") == ["none (training-free)", "width_router.safetensors"]
    assert _choices("DynamicTokenRouter", "router_file") == ["none", "token_router.safetensors"]
    assert _choices("DynamicPatchScheduler", "embedding") == ["none", "coarse_patches.safetensors"]
    # TD-LoRA: its own files, files without a format (plain LoRAs, or damaged: picked, they say why), and loras/
    assert sorted(_choices("DynamicTDLoRALoader", "file")) == [
        "dynamic_dit/damaged.safetensors", "dynamic_dit/experts.safetensors", "dynamic_dit/no_metadata.safetensors",
        "loras/style.safetensors",
    ]


def test_a_file_rewritten_as_another_kind_moves_to_that_list(model_folders):
    import os

    path = model_folders / "token_router.safetensors"
    save_file({"x": torch.zeros(3)}, str(path), metadata={"format": "dynamic_dit.width_router", "version": "1"})
    os.utime(path, (1, 1))  # even with an unchanged mtime the size differs; the header is read again
    assert "token_router.safetensors" in _choices("DynamicWidthPatcher", "router")
    assert _choices("DynamicTokenRouter", "router_file") == ["none"]
