"""Training DDiT's coarse patches (embedding, de-embedding, patch-size identifier, coarse-only block LoRA)
on the tiny Flux: the loss falls, the file reproduces the training forward in a real sampling run, refusals."""
from __future__ import annotations

import pytest
import torch
from support.training import SAMPLING, sampling_through, student_for

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import apply_settings, check_base_weights, plan_of
from comfyui_dynamic_dit.core.files import header_metadata
from comfyui_dynamic_dit.methods.patch_scheduler.file import load_patch_embedding_file
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule
from comfyui_dynamic_dit.methods.patch_scheduler.trainable import coarse_step_indices
from comfyui_dynamic_dit.training.export import save_student, training_metadata
from comfyui_dynamic_dit.training.trainer import TrainConfig, evaluate, train

SCHEDULE = "0-70%:2"  # 8 steps: steps 0-5 coarse (0, 12.5, ..., 62.5 %), 6 and 7 native


@pytest.fixture(scope="module")
def trained(flux_model, bank):
    student = student_for(flux_model, bank, parts=("coarse",), coarse_schedule=SCHEDULE)
    rows = student.training_rows(bank)
    before = evaluate(student, rows, 16)
    result = train(student, bank, TrainConfig(steps=40, batch=4, checkpoint_every=1000), progress_bar=False)
    return student, result, before


def test_trains_on_the_coarse_steps_rows_only(flux_model, bank):
    student = student_for(flux_model, bank, parts=("coarse",), coarse_schedule=SCHEDULE)
    rows = student.training_rows(bank)
    assert coarse_step_indices(student["coarse"].schedule, 8) == [0, 1, 2, 3, 4, 5]
    assert rows.rows == bank.rows * 6 // 8
    assert rows.timesteps == bank.timesteps  # the schedule stays whole for the FLOPs of the run


def test_the_loss_falls_and_the_ratio_is_the_schedules(trained, flux_model):
    student, result, before = trained
    assert result.eval_loss < 0.7 * before, (before, result.eval_loss)
    # 6 of 8 steps coarse at a quarter of the image tokens: well under full compute, above 6/8 * 1/4 + 2/8
    assert 6 / 8 * 0.25 + 2 / 8 < result.final_ratio < 0.7
    assert all(h["ratio"] == pytest.approx(result.final_ratio) for h in result.history)


def test_the_file_samples_what_the_student_computed(trained, flux_model, bank, tmp_path):
    """The written patch embedding file (version 2, with its block LoRA), loaded by the Patch Scheduler in manual
    mode, samples the image the student's training forward gives at the coarse steps (native steps: the model)."""
    student, result, _ = trained
    metadata = training_metadata(student, target=1.0, steps=result.steps, command="test", base_model="tiny")
    (path,) = save_student(student, tmp_path / "coarse", metadata)
    assert path.name == "coarse.patch_embedding.safetensors"
    header = header_metadata(path)
    assert header["coarse_schedule"] == SCHEDULE and header["version"] == "2"
    check_base_weights(flux_model, header, path.name)
    embedding = load_patch_embedding_file(path)
    assert embedding.factors == (2,) and len(embedding.lora[2]) == len(student.blocks)
    patched = apply_settings(flux_model, PatchSchedulerSettings(mode="manual", schedule=parse_schedule(SCHEDULE), embedding=embedding))
    positive, negative = tiny_flux.conditioning(tiny_flux.TinyFlux(), seed=0)
    sampling = dict(height=16, width=16, steps=SAMPLING["steps"], cfg=SAMPLING["cfg"])
    loaded = tiny_flux.sample(patched, positive, negative, **sampling)
    run = plan_of(patched).telemetry.latest()
    assert run.executed_flops / run.full_flops == pytest.approx(result.final_ratio, rel=0.02)

    coarse_timesteps = [bank.timesteps[s] for s in coarse_step_indices(student["coarse"].schedule, len(bank.timesteps))]

    wrapped = sampling_through(flux_model, student, only_timesteps=coarse_timesteps)
    reference = tiny_flux.sample(wrapped, positive, negative, **sampling)
    full = tiny_flux.sample(flux_model, positive, negative, **sampling)
    assert (loaded - full).abs().max() > 1e-3
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    (dict(parts=("coarse", "width")), "coarse patches are trained on their own"),
    (dict(parts=("coarse",), coarse_schedule="0-50%:2, 50-100%:4"), "exactly one coarse factor"),
    (dict(parts=("coarse",), coarse_schedule="0-100%:1"), "exactly one coarse factor"),
    (dict(parts=("coarse",), coarse_schedule="soon"), "Cannot read 'soon'"),
    (dict(parts=("coarse",), coarse_init="nearest"), "coarse initialisation must be one of"),
])
def test_bad_coarse_settings_are_refused_before_any_work(flux_model, bank, spec, message):
    with pytest.raises(ValueError, match=message):
        student_for(flux_model, bank, **spec)


def test_a_schedule_with_no_coarse_step_in_the_run_is_refused(flux_model, bank):
    student = student_for(flux_model, bank, parts=("coarse",), coarse_schedule="95-100%:2")
    with pytest.raises(ValueError, match="runs no step of the 8-step teacher runs coarse"):
        train(student, bank, TrainConfig(steps=2, batch=2), progress_bar=False)

