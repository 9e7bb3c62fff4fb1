"""The Dynamic Patch Scheduler node: inputs, embedding files from models/dynamic_dit/, clear errors."""
import copy

import pytest
import torch

from support.nodes import combo_options, node_outputs, write_flux_embedding

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import plan_of
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

Scheduler = NODE_CLASS_MAPPINGS["DynamicPatchScheduler"]

INPUTS = dict(mode="auto", tau=5.0, percentile=0.4, max_patch_factor=2, last_native_steps=2,
              manual_schedule="0-40%:4, 40-70%:2, 70-100%:1", embedding="none", start_percent=0.0, end_percent=1.0)


write_embedding = write_flux_embedding  # (the name the tests below use)


def test_declaration(model_folder, flux_model):
    write_embedding(model_folder, flux_model)
    declared = Scheduler.INPUT_TYPES()["required"]
    assert list(declared) == ["model", *INPUTS]
    assert combo_options(declared["embedding"]) == ["none", "coarse.safetensors"]
    assert combo_options(declared["mode"]) == ["auto", "manual", "as trained"]
    assert declared["tau"][1]["default"] == 5.0 and declared["percentile"][1]["default"] == 0.4
    assert declared["max_patch_factor"][1]["default"] == 2
    assert NODE_DISPLAY_NAME_MAPPINGS["DynamicPatchScheduler"] == "Dynamic Patch Scheduler"
    assert tuple(Scheduler.RETURN_TYPES) == ("MODEL",) and Scheduler.CATEGORY == "dynamic_dit/methods"


def test_manual_schedule_with_a_trained_file(model_folder, flux_model, conds):
    name = write_embedding(model_folder, flux_model)
    (model,) = node_outputs(Scheduler, flux_model, **{**INPUTS, "mode": "manual", "embedding": name,
                                                "manual_schedule": "0-50%:4; 50-75%:2"})
    settings = plan_of(model).settings["patch_scheduler"]
    assert settings.embedding.factors == (2, 4) and settings.schedule[1].factor == 2
    out = tiny_flux.sample(model, *conds, steps=4, cfg=1.0, seed=2)
    assert torch.isfinite(out).all()
    steps = plan_of(model).telemetry.latest().steps()
    assert [s.methods["patch_scheduler"][:8] for s in steps] == ["patch 4x", "patch 4x", "patch 2x", "native ("]


def test_auto_mode_ignores_the_manual_schedule_text(flux_model):
    (model,) = node_outputs(Scheduler, flux_model, **{**INPUTS, "manual_schedule": "not a schedule"})
    assert plan_of(model).settings["patch_scheduler"].schedule == ()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "manual", "manual_schedule": "0-40%:4, 30-70%:2"}, "overlapping ranges"),
        ({"mode": "manual", "manual_schedule": "first half coarse"}, "Cannot read 'first half coarse'"),
        ({"percentile": 1.5}, "percentile must be between 0 and 1"),
        ({"start_percent": 0.9, "end_percent": 0.1}, "0 <= start <= end <= 1"),
        ({"embedding": "missing.safetensors"}, "Patch embedding 'missing.safetensors' was not found in the dynamic_dit model folder"),
    ],
)
def test_bad_inputs_raise_and_leave_the_model_unpatched(model_folder, flux_model, changes, message):
    before = copy.deepcopy(flux_model.model_options)
    with pytest.raises(ValueError, match=message):
        node_outputs(Scheduler, flux_model, **{**INPUTS, **changes})
    assert flux_model.model_options == before and plan_of(flux_model) is None


def test_a_bad_embedding_file_raises_and_leaves_the_model_unpatched(model_folder, flux_model, other_flux_model):
    (model_folder / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    other = write_embedding(model_folder, other_flux_model, "other.safetensors")
    before = copy.deepcopy(flux_model.model_options)
    with pytest.raises(ValueError, match="Patch embedding 'broken.safetensors' is not a readable safetensors file"):
        node_outputs(Scheduler, flux_model, **{**INPUTS, "embedding": "broken.safetensors"})
    with pytest.raises(ValueError, match="'other.safetensors' was made for another model: hidden_size is 192"):
        node_outputs(Scheduler, flux_model, **{**INPUTS, "embedding": other})
    assert flux_model.model_options == before and plan_of(flux_model) is None


def test_applying_the_node_twice_replaces_its_settings(flux_model):
    (once,) = node_outputs(Scheduler, flux_model, **INPUTS)
    (twice,) = node_outputs(Scheduler, once, **{**INPUTS, "tau": 0.05})
    assert list(plan_of(twice).settings) == ["patch_scheduler"]
    assert plan_of(twice).settings["patch_scheduler"].tau == 0.05
    assert plan_of(once).settings["patch_scheduler"].tau == 5.0
