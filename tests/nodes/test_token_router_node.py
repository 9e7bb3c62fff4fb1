"""The Token Router node: settings from widgets, router files from models/dynamic_dit/, clear errors."""
import pytest
import torch

import folder_paths

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, plan_of
from comfyui_dynamic_dit.methods.token_router.file import save_router_file
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import combo_options, node_outputs

Router = NODE_CLASS_MAPPINGS["DynamicTokenRouter"]
Telemetry = NODE_CLASS_MAPPINGS["DynamicTelemetry"]

WIDGETS = dict(mode="reuse", keep_ratio_start=0.5, keep_ratio_end=0.5, first_full_blocks=1, last_full_blocks=1,
               score="input change", router_file="none", use_file_ratios=True, start_percent=0.0, end_percent=1.0,
               block_overrides="")
SAMPLE = dict(steps=3, seed=8, cfg=2.0, height=16, width=16)


@pytest.fixture
def router_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dynamic_dit", ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def patch(model, **changes):
    return node_outputs(Router, model, **{**WIDGETS, **changes})[0]


def test_widgets_become_settings(flux_model, conds):
    model = patch(flux_model, mode="diffcr", keep_ratio_start=0.7, keep_ratio_end=0.3, score="update magnitude",
                  block_overrides="single:1-2=0.25", start_percent=0.1, end_percent=0.9)
    settings = plan_of(model).settings["token_router"]
    assert (settings.mode, settings.keep_start, settings.keep_end, settings.score) == ("diffcr", 0.7, 0.3, "update")
    assert (settings.first_full, settings.last_full, settings.start_percent, settings.end_percent) == (1, 1, 0.1, 0.9)
    assert [(o.kind, o.first, o.last, o.ratio) for o in settings.overrides] == [("single", 1, 2, 0.25)]
    assert plan_of(flux_model) is None  # the input model is untouched
    out = tiny_flux.sample(model, *conds, **SAMPLE)
    assert torch.isfinite(out).all()
    assert "token router (diffcr, keep 0.7->0.3, update magnitude)" in plan_of(model).telemetry.latest().plan


def test_full_keep_ratio_through_the_node_is_identical(flux_model, conds):
    reference = tiny_flux.sample(flux_model, *conds, **SAMPLE)
    for mode in ("reuse", "diffcr", "sdt"):
        model = patch(flux_model, mode=mode, keep_ratio_start=1.0, keep_ratio_end=1.0)
        assert torch.equal(tiny_flux.sample(model, *conds, **SAMPLE), reference)


def test_applied_twice_replaces_and_order_with_telemetry_does_not_matter(flux_model, conds):
    twice = patch(patch(flux_model, keep_ratio_start=0.2), keep_ratio_start=0.6)
    once = patch(flux_model, keep_ratio_start=0.6)
    assert plan_of(twice).settings["token_router"].keep_start == 0.6 and list(plan_of(twice).settings) == ["token_router"]
    out = tiny_flux.sample(once, *conds, **SAMPLE)
    assert torch.equal(tiny_flux.sample(twice, *conds, **SAMPLE), out)
    (telemetry_first,) = node_outputs(Telemetry, flux_model)
    assert torch.equal(tiny_flux.sample(patch(telemetry_first, keep_ratio_start=0.6), *conds, **SAMPLE), out)
    (telemetry_last,) = node_outputs(Telemetry, once)
    assert torch.equal(tiny_flux.sample(telemetry_last, *conds, **SAMPLE), out)


def test_router_file_from_the_model_folder(flux_model, conds, router_folder):
    adapter = adapter_of(flux_model)
    routers = {b.label: {"weight": torch.randn(1, 256) * 0.1, "bias": torch.zeros(1)} for b in adapter.blocks}
    save_router_file(router_folder / "flux_diffcr.safetensors", adapter, "diffcr", routers, ratios=torch.full((1, 6), 0.25))
    assert "flux_diffcr.safetensors" in combo_options(Router.INPUT_TYPES()["required"]["router_file"])
    model = patch(flux_model, mode="diffcr", score="router file", router_file="flux_diffcr.safetensors", first_full_blocks=0,
                  last_full_blocks=0)
    settings = plan_of(model).settings["token_router"]
    assert settings.router.router == "diffcr" and settings.router_name == "flux_diffcr.safetensors"
    tiny_flux.sample(model, *conds, **SAMPLE)
    run = plan_of(model).telemetry.latest()
    assert all(c.blocks["single.0"] == {"tokens": 16, "of": 64} for c in run.calls)  # the file's ratio 0.25
    model = patch(flux_model, mode="diffcr", score="router file", router_file="flux_diffcr.safetensors", use_file_ratios=False,
                  first_full_blocks=0, last_full_blocks=0)
    tiny_flux.sample(model, *conds, **SAMPLE)
    assert all(c.blocks["single.0"] == {"tokens": 32, "of": 64} for c in plan_of(model).telemetry.latest().calls)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(router_file="broken.safetensors"), "Router file 'broken.safetensors' is not a readable safetensors file"),
        (dict(router_file="gone.safetensors"), r"'gone.safetensors' was not found in the dynamic_dit model folder"),
        (dict(router_file="other.safetensors"), "made for another model: hidden_size is 192 in the file, 256 in this model"),
        (dict(score="router file"), "the score 'router file' needs a router file"),
        (dict(block_overrides="single:1-2=0.5, single:2-x=0.5"), r"cannot read the block override 'single:2-x=0.5'"),
        (dict(block_overrides="double:7=0.5"), r"'double:7=0.5': double blocks are numbered 0-1"),
        (dict(start_percent=0.9, end_percent=0.1), r"need 0 <= start_percent <= end_percent <= 1"),
        (dict(mode="turbo"), "mode must be one of sdt, diffcr, reuse"),
    ],
)
def test_bad_input_raises_and_the_model_stays_unpatched(flux_model, other_flux_model, router_folder, changes, message):
    (router_folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    save_router_file(router_folder / "other.safetensors", adapter_of(other_flux_model), "diffcr",
                     {"double.0": {"weight": torch.ones(1, 192), "bias": torch.zeros(1)}})
    before = dict(flux_model.model_options)
    with pytest.raises(ValueError, match=message):
        patch(flux_model, **changes)
    assert flux_model.model_options == before and plan_of(flux_model) is None
