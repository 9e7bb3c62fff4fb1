"""The self-distillation trainer on a tiny real ComfyUI Flux: loss and compute target, resume, files, refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from comfyui_dynamic_dit.families import UnsupportedModelError
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.integration.patching import apply_settings, check_base_weights, diffusion_model_of
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora
from comfyui_dynamic_dit.core.files import header_metadata
from comfyui_dynamic_dit.methods.td_lora.binding import bind_layers
from comfyui_dynamic_dit.methods.td_lora.file import load_td_lora_file
from comfyui_dynamic_dit.methods.width.settings import WidthSettings
from comfyui_dynamic_dit.methods.width.file import load_width_router
from comfyui_dynamic_dit.training.export import save_student, training_metadata
from comfyui_dynamic_dit.training.trainer import TrainConfig, evaluate, schedule_ratio, train

from support.training import LATENT, SAMPLING, sampling_through, student_for

TARGET = 0.6


def config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(target=TARGET, steps=50, batch=4, checkpoint_every=1000), **changes)


@pytest.fixture(scope="module")
def trained(flux_model, bank, tmp_path_factory):
    """50 steps, interrupted where the warm-down to the target ends and resumed from the checkpoint."""
    checkpoint = tmp_path_factory.mktemp("train") / "run.ckpt"
    cfg = config()
    warm_end = cfg.compute_target().hold + cfg.compute_target().warmup
    student = student_for(flux_model, bank)
    train(student, bank, cfg, checkpoint=checkpoint, progress_bar=False, stop_after=warm_end)
    at_target = dict(ratio=schedule_ratio(student, bank), loss=evaluate(student, bank, 16))
    resumed = student_for(flux_model, bank, seed=123)  # fresh weights: everything must come from the checkpoint
    result = train(resumed, bank, cfg, checkpoint=checkpoint, progress_bar=False)
    return resumed, result, at_target, warm_end


def test_records_the_teachers_trajectories(bank):
    # 2 conditionings x 8 steps, cond and uncond per call (cfg 2)
    assert bank.rows == 2 * 8 * 2
    assert len(bank.timesteps) == 8
    row = bank.fixed(1)
    assert row[bank.latent_argument].shape == (1, 16, 16, 16) and row["target"].shape == (1, 16, 16, 16)


def test_untrained_student_is_the_teacher(flux_model, bank):
    student = student_for(flux_model, bank)
    batch = bank.fixed(8)
    with torch.no_grad():
        out, _ = student(batch, noise=0.0)
    # every unit kept, bypasses zero: the teacher's own output, up to the rounding of another batch size
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)


def test_fifty_steps_meet_the_target_and_the_loss_falls(trained):
    student, result, at_target, warm_end = trained
    assert result.steps == 50
    assert abs(result.final_ratio - TARGET) <= 0.05 * TARGET, result.final_ratio
    assert abs(at_target["ratio"] - TARGET) <= 0.1 * TARGET  # the warm-down reached the target ...
    assert result.eval_loss < 0.9 * at_target["loss"], (at_target, result.eval_loss)  # ... and training then won fidelity
    distill = [h["distill"] for h in result.history[warm_end:]]
    assert sum(distill[-10:]) / 10 < sum(distill[:10]) / 10


def test_resume_continues_from_the_saved_step(flux_model, bank, tmp_path):
    cfg = config(steps=8, checkpoint_every=2)
    straight = student_for(flux_model, bank)
    train(straight, bank, cfg, progress_bar=False)
    checkpoint = tmp_path / "run.ckpt"
    first = student_for(flux_model, bank)
    partial = train(first, bank, cfg, checkpoint=checkpoint, progress_bar=False, stop_after=5)
    assert partial.steps == 5 and torch.load(checkpoint, weights_only=False)["step"] == 5
    second = student_for(flux_model, bank, seed=99)
    resumed = train(second, bank, cfg, checkpoint=checkpoint, progress_bar=False)
    assert [h["step"] for h in resumed.history] == list(range(1, 9))
    for (name, a), b in zip(straight.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_files_round_trip_through_the_loaders(trained, flux_model, bank, tmp_path):
    """The written files, loaded by the pack's loaders and run by the executor (sliced weights, gated bypass),
    sample the same image as the trained student's masked training forward."""
    student, *_ = trained
    metadata = training_metadata(student, target=TARGET, steps=50, command="test", base_model="tiny")
    paths = save_student(student, tmp_path / "trained", metadata)
    assert [p.name for p in paths] == ["trained.width.safetensors", "trained.td_lora.safetensors"]
    for path in paths:
        assert header_metadata(path)["target_flops"] == "0.6"
        check_base_weights(flux_model, header_metadata(path), path.name)
    router = load_width_router(paths[0])
    lora = load_td_lora_file(paths[1])
    patched = apply_settings(flux_model, WidthSettings(router=router))
    patched = apply_td_lora(patched, lora, 1.0)
    positive, negative = tiny_flux.conditioning(tiny_flux.TinyFlux(), seed=0)
    loaded = tiny_flux.sample(patched, positive, negative, height=16, width=16, **{k: SAMPLING[k] for k in ("steps", "cfg")})

    masked = sampling_through(flux_model, student)
    reference = tiny_flux.sample(masked, positive, negative, height=16, width=16, **{k: SAMPLING[k] for k in ("steps", "cfg")})
    full = tiny_flux.sample(flux_model, positive, negative, height=16, width=16, **{k: SAMPLING[k] for k in ("steps", "cfg")})
    assert (loaded - full).abs().max() > 1e-3  # the trained parts do change the model ...
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-4)  # ... exactly as the student did in training


def test_a_file_for_another_model_is_refused(trained, other_flux_model, tmp_path):
    student, *_ = trained
    metadata = training_metadata(student, target=TARGET, steps=50, command="test", base_model="tiny seed 0")
    width_path, lora_path = save_student(student, tmp_path / "trained", metadata)
    # another shape: the formats' own checks
    with pytest.raises(ValueError, match="made for"):
        apply_settings(other_flux_model, WidthSettings(router=load_width_router(width_path)))
    with pytest.raises(ValueError, match="made for another model"):
        bind_layers(load_td_lora_file(lora_path), training_host.adapter_of(other_flux_model),
                    diffusion_model_of(other_flux_model))
    # the same shape, other weights: the fingerprint
    same_shape = reference_model.build_model(tiny_flux.TinyFlux(seed=5))
    for path in (width_path, lora_path):
        with pytest.raises(ValueError, match="trained for another base model"):
            check_base_weights(same_shape, header_metadata(path), path.name)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, float("nan")])
def test_a_target_outside_0_1_is_refused_before_any_work(target):
    with pytest.raises(ValueError, match=r"target FLOPs ratio must be in \(0, 1\]"):
        TrainConfig(target=target).validate()


def test_no_conditioning_and_unsupported_models_are_refused(flux_model):
    with pytest.raises(ValueError, match="no conditioning"):
        training_host.record_trajectories(flux_model, [], LATENT, seeds=[0], **SAMPLING)

    class NotADiT(torch.nn.Module):
        pass

    patcher = type("Patcher", (), {"model": type("Model", (), {"diffusion_model": NotADiT()})()})()
    with pytest.raises(UnsupportedModelError):
        training_host.adapter_of(patcher)
