"""TD-LoRA Loader node: files from models/dynamic_dit/ and models/loras/, equality with LoraLoaderModelOnly, errors."""
import pytest
import torch
from safetensors.torch import save_file

import folder_paths
import nodes as comfy_nodes

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, plan_of
from comfyui_dynamic_dit.methods.td_lora.binding import architecture_metadata, block_linear_shapes
from comfyui_dynamic_dit.methods.td_lora.file import random_td_lora, save_td_lora_file, td_lora_state_dict
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import combo_options, node_outputs

Loader = NODE_CLASS_MAPPINGS["DynamicTDLoRALoader"]
SAMPLE = dict(steps=3, cfg=2.0, seed=3)


@pytest.fixture
def folders(tmp_path, monkeypatch):
    dynamic, loras = tmp_path / "dynamic_dit", tmp_path / "loras"
    dynamic.mkdir()
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dynamic_dit", ([str(dynamic)], {".safetensors"}))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], set(folder_paths.supported_pt_extensions)))
    return dynamic, loras


def layers_of(model, experts, seed=0):
    return random_td_lora(block_linear_shapes(adapter_of(model), model.model.diffusion_model), experts=experts, rank=4, seed=seed)


def write_td(model, path, experts, seed=0, architecture_of=None):
    layers, gate = layers_of(model, experts, seed)
    save_td_lora_file(path, layers, architecture_metadata(adapter_of(architecture_of or model)), gate)
    return layers


def unchanged(model):
    return dict(model.model_options), {k: list(v) for k, v in model.patches.items()}


def test_the_file_list_holds_td_loras_and_every_lora(flux_model, folders):
    dynamic, loras = folders
    write_td(flux_model, dynamic / "k3.safetensors", 3)
    save_file({"w": torch.zeros(2)}, str(dynamic / "router.safetensors"), metadata={"format": "token_router"})
    (dynamic / "damaged.safetensors").write_bytes(b"\x10\x00")  # listed, so its error can show
    save_file({"x.lora_A.weight": torch.zeros(1, 2)}, str(loras / "style.safetensors"))
    choices = combo_options(Loader.INPUT_TYPES()["required"]["file"])
    assert choices == ["dynamic_dit/damaged.safetensors", "dynamic_dit/k3.safetensors", "loras/style.safetensors"]


def test_k1_file_gives_the_output_of_lora_loader_model_only(flux_model, conds, folders, float32_rounding):
    dynamic, loras = folders
    layers = write_td(flux_model, dynamic / "k1.safetensors", 1, seed=2)
    plain = {}
    for path, layer in layers.items():  # the same weights as a plain LoRA, for ComfyUI's loader
        plain[f"diffusion_model.{path}.lora_A.weight"] = layer.lora_A[0]
        plain[f"diffusion_model.{path}.lora_B.weight"] = layer.lora_B[0]
        plain[f"diffusion_model.{path}.alpha"] = torch.tensor(layer.alpha)
    save_file(plain, str(loras / "plain.safetensors"))
    (reference,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(flux_model, "plain.safetensors", 0.75)
    expected = tiny_flux.sample(reference, *conds, **SAMPLE)
    for choice in ("dynamic_dit/k1.safetensors", "loras/plain.safetensors"):
        (model,) = node_outputs(Loader, flux_model, choice, 0.75)
        torch.testing.assert_close(tiny_flux.sample(model, *conds, **SAMPLE), expected, **float32_rounding(expected))
    assert not torch.allclose(expected, tiny_flux.sample(flux_model, *conds, **SAMPLE), atol=1e-2)


def test_k3_file_records_its_gates(flux_model, conds, folders):
    write_td(flux_model, folders[0] / "k3.safetensors", 3)
    (model,) = node_outputs(Loader, flux_model, "dynamic_dit/k3.safetensors", 1.0)
    tiny_flux.sample(model, *conds, **SAMPLE)
    run = plan_of(model).telemetry.latest()
    assert run.plan == "TD-LoRA k3 K=3 x1"
    assert all(step.methods["td_lora"].startswith("K=3 x1 gates ") for step in run.steps())


def test_strength_zero_is_the_unchanged_model(flux_model, conds, folders):
    write_td(flux_model, folders[0] / "k3.safetensors", 3)
    (model,) = node_outputs(Loader, flux_model, "dynamic_dit/k3.safetensors", 0.0)
    assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), tiny_flux.sample(flux_model, *conds, **SAMPLE))


def _truncated(model, other, folders):
    write_td(model, folders[0] / "cut.safetensors", 3)
    data = (folders[0] / "cut.safetensors").read_bytes()
    (folders[0] / "cut.safetensors").write_bytes(data[: len(data) * 2 // 3])
    return "dynamic_dit/cut.safetensors"


def _missing_key(model, other, folders):
    layers, gate = layers_of(model, 3)
    tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter_of(model)), gate)
    del tensors["single_blocks.1.linear2.lora_B"]
    save_file(tensors, str(folders[0] / "missing.safetensors"), metadata=metadata)
    return "dynamic_dit/missing.safetensors"


def _other_architecture(model, other, folders):
    write_td(model, folders[0] / "other.safetensors", 3, architecture_of=other)
    return "dynamic_dit/other.safetensors"


def _shape_mismatch(model, other, folders):
    save_file({"lora_unet_single_blocks_0_linear2.lora_down.weight": torch.zeros(4, 1024),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(256, 4)}, str(folders[1] / "wrong.safetensors"))
    return "loras/wrong.safetensors"


ERRORS = [
    (_truncated, "cut.safetensors is not a readable safetensors file .*truncated"),
    (_missing_key, "missing key 'single_blocks.1.linear2.lora_B'"),
    (_other_architecture, "made for another model: metadata 'hidden_size' is '192'"),
    (_shape_mismatch, "^loras/wrong.safetensors is for another model, or another size of Flux.1: its "
                      "'lora_unet_single_blocks_0_linear2' does not fit this model's 'diffusion_model.single_blocks.0.linear2.weight' "
                      "\\(256, 1280\\)"),
]


@pytest.mark.parametrize("make,message", ERRORS, ids=["truncated", "missing_key", "other_architecture", "shape_mismatch"])
def test_bad_files_raise_a_clear_error_and_the_model_stays_unpatched(flux_model, other_flux_model, folders, make, message):
    choice = make(flux_model, other_flux_model, folders)
    before = unchanged(flux_model)
    with pytest.raises(ValueError, match=message):
        node_outputs(Loader, flux_model, choice, 1.0)
    assert unchanged(flux_model) == before


def test_unknown_choices_and_strengths_are_refused(flux_model, folders):
    write_td(flux_model, folders[0] / "k3.safetensors", 3)
    with pytest.raises(ValueError, match="'gone.safetensors' is not in the 'dynamic_dit' model folder"):
        node_outputs(Loader, flux_model, "dynamic_dit/gone.safetensors", 1.0)
    with pytest.raises(ValueError, match="expected 'dynamic_dit/<file>' or 'loras/<file>'"):
        node_outputs(Loader, flux_model, "k3.safetensors", 1.0)
    with pytest.raises(ValueError, match="strength must be between -10 and 10, got -12"):
        node_outputs(Loader, flux_model, "dynamic_dit/k3.safetensors", -12.0)
