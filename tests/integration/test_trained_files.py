"""A training run's files applied as trained, by stem: what the Train node returns and the benchmark's `trained:` runs."""
from __future__ import annotations

import pytest
import torch
from support.training import LATENT, SAMPLING, student_for

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.devtools.bench.cases import CASE_BUILDERS
from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.integration.patching import plan_of
from comfyui_dynamic_dit.integration.trained_files import apply_trained_files, parts_of, run_files
from comfyui_dynamic_dit.training.export import save_bundle, save_student, training_metadata


@pytest.fixture(scope="module")
def run_stem(flux_model, tiny_config, tmp_path_factory):
    jobs = [tiny_flux.conditioning(tiny_config, seed=0)]
    bank = training_host.record_trajectories(flux_model, jobs, LATENT, seeds=[0], **{**SAMPLING, "steps": 4})
    student = student_for(flux_model, bank, parts=("tokens", "td_lora"))
    stem = tmp_path_factory.mktemp("run") / "run"
    metadata = training_metadata(student, target=0.5, steps=0, command="test", base_model="tiny")
    save_student(student, stem, metadata)
    bundle = tmp_path_factory.mktemp("bundle") / "run"
    save_bundle(student, bundle, metadata)
    return stem, bundle


@pytest.mark.parametrize("kind", ["part files", "bundle"])
def test_finds_the_runs_files_and_applies_each_as_trained(flux_model, conds, run_stem, kind):
    stem = run_stem[0] if kind == "part files" else run_stem[1]
    paths = run_files(stem)
    if kind == "part files":
        assert [p.name for p in paths] == ["run.td_lora.safetensors", "run.token_router.safetensors"]
        assert [parts_of(p) for p in paths] == [["td_lora"], ["tokens"]]
    else:
        assert [p.name for p in paths] == ["run.safetensors"] and parts_of(paths[0]) == ["td_lora", "tokens"]
    patched = apply_trained_files(flux_model, paths)
    settings = plan_of(patched).settings["token_router"]
    assert (settings.mode, settings.score, settings.first_full, settings.last_full) == ("diffcr", "router", 0, 0)
    assert plan_of(flux_model) is None
    case = CASE_BUILDERS["trained"](str(stem))
    assert case.name == "trained run (TD-LoRA + token routers)"
    # the bundle and the part files sample the same image
    images = [tiny_flux.sample(apply_trained_files(flux_model, run_files(s)), *conds, height=16, width=16, steps=3)
              for s in run_stem]
    assert torch.equal(images[0], images[1])


def test_another_model_or_a_foreign_file_is_refused_and_nothing_is_applied(run_stem, tmp_path):
    other = reference_model.build_model(tiny_flux.TinyFlux(seed=3))
    before = dict(other.model_options)
    with pytest.raises(ValueError, match="trained for another base model"):
        apply_trained_files(other, run_files(run_stem[1]))
    assert other.model_options == before and plan_of(other) is None
    with pytest.raises(ValueError, match="is not a training run's file"):
        parts_of(tmp_path / "router.safetensors")
    with pytest.raises(ValueError, match="no file of the run"):
        CASE_BUILDERS["trained"](str(tmp_path / "nothing"))
