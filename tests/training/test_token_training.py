"""Training token routers and per-layer, per-timestep keep ratios (with TD-LoRA as compensation) on the tiny Flux,
for DiffCR (left-out tokens skip the block) and DyDiT's SDT (they skip the MLP): the student starts as the teacher,
the loss falls at the target, the file reproduces the student in a real sampling run through the Token Router,
refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from support.training import SAMPLING, sampling_through, student_for

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import apply_settings, check_base_weights, plan_of
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora
from comfyui_dynamic_dit.core.files import header_metadata
from comfyui_dynamic_dit.methods.td_lora.file import load_td_lora_file
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.token_router.file import load_router_file
from comfyui_dynamic_dit.training.export import save_student, training_metadata
from comfyui_dynamic_dit.training.mutation import mutation_context
from comfyui_dynamic_dit.training.trainer import TrainConfig, evaluate, schedule_ratio, train

TARGETS = {"diffcr": 0.6, "sdt": 0.75}  # SDT keeps attention for every token: its floor here is 0.54 (0.1 kept)
PARTS = ("tokens", "td_lora")


def config(mode: str = "diffcr", **changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(target=TARGETS[mode], steps=50, batch=4, checkpoint_every=1000), **changes)


@pytest.fixture(scope="module", params=["diffcr", "sdt"])
def mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def trained(flux_model, bank, mode):
    student = student_for(flux_model, bank, parts=PARTS, ratio_regions=2, token_mode=mode)
    cfg = config(mode)
    warm_end = cfg.compute_target().hold + cfg.compute_target().warmup
    result = train(student, bank, cfg, progress_bar=False)
    return student, result, warm_end


def test_untrained_student_is_the_teacher(flux_model, bank, mode):
    student = student_for(flux_model, bank, parts=PARTS, token_mode=mode)
    batch = bank.fixed(8)
    with torch.no_grad():
        out, ratios = student(batch, noise=0.0)
    # every keep ratio 1 (full blocks, no router), bypasses zero: the teacher's output
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)
    assert schedule_ratio(student, bank) == pytest.approx(float(ratios[0])) and ratios.min() > 1.0  # the bypass costs
    routers_only = student_for(flux_model, bank, parts=("tokens",), token_mode=mode)
    with torch.no_grad():
        assert torch.equal(routers_only(batch, noise=0.0)[1], torch.ones(8))


def test_fifty_steps_meet_the_target_and_the_loss_falls(trained, flux_model, bank, mode):
    student, result, warm_end = trained
    assert abs(result.final_ratio - TARGETS[mode]) <= 0.05 * TARGETS[mode], result.final_ratio
    # the same learned ratios with untrained routers and no compensation: training won fidelity at that compute
    untrained = student_for(flux_model, bank, parts=PARTS, ratio_regions=2, seed=5, token_mode=mode)
    with torch.no_grad():
        untrained["tokens"].ratio.copy_(student["tokens"].ratio)
    assert schedule_ratio(untrained, bank) == pytest.approx(result.final_ratio)
    before = evaluate(untrained, bank, 16)
    assert result.eval_loss < 0.7 * before, (before, result.eval_loss)
    ratios = student["tokens"].ratio.detach()
    assert ratios.min() >= student.spec.min_keep and ratios.max() <= 1.0


def test_the_ratio_has_a_gradient_through_the_bin_interpolation(flux_model, bank, mode):
    """DiffCR's interpolation between ratio bins gives the distillation loss a gradient in every routed ratio, and
    the router one (SDT: through the straight-through estimator)."""
    student = student_for(flux_model, bank, parts=("tokens",), ratio_regions=1, token_mode=mode)
    with torch.no_grad():
        student["tokens"].ratio.fill_(0.63)  # between the bins 0.60 and 0.65
    batch = bank.fixed(4)
    with mutation_context("allow"):  # the host's blocks write into their inputs
        out, ratios = student(batch)
        (out - batch["target"]).pow(2).mean().backward()
    grad = student["tokens"].ratio.grad
    assert grad is not None and (grad.abs() > 0).all(), grad
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student["tokens"].router_parameters())
    # the differentiable FLOPs interpolate between the bins' exact counts
    exact = [student["tokens"].call_ratio_at(student, student.adapter.call_layout(student.arguments(batch)), torch.full((6,), r), grad=False)
             for r in (0.60, 0.65)]
    assert exact[0] < float(ratios[0].detach()) < exact[1]


def test_the_file_samples_what_the_student_computed(trained, flux_model, tmp_path, mode):
    """The written token-router file (routers + ratios) and TD-LoRA file, loaded by the Token Router as trained
    (its diffcr or sdt mode, by the file's router kind) and the TD-LoRA loader, sample the image the student's forward
    gives, at the FLOPs it counted."""
    student, result, _ = trained
    metadata = training_metadata(student, target=TARGETS[mode], steps=result.steps, command="test", base_model="tiny")
    paths = save_student(student, tmp_path / "routed", metadata)
    assert sorted(p.name for p in paths) == ["routed.td_lora.safetensors", "routed.token_router.safetensors"]
    router_path = tmp_path / "routed.token_router.safetensors"
    check_base_weights(flux_model, header_metadata(router_path), router_path.name)
    router = load_router_file(router_path)
    assert router.router == {"diffcr": "diffcr", "sdt": "dydit"}[mode] and len(router.routers) == len(student.blocks)
    assert router.ratios.shape == (2, len(student.blocks))
    settings = TokenRouterSettings.as_trained(router)
    assert settings.mode == mode
    patched = apply_settings(flux_model, settings)
    patched = apply_td_lora(patched, load_td_lora_file(tmp_path / "routed.td_lora.safetensors"), strength=1.0)
    positive, negative = tiny_flux.conditioning(tiny_flux.TinyFlux(), seed=0)
    sampling = dict(height=16, width=16, steps=SAMPLING["steps"], cfg=SAMPLING["cfg"])
    loaded = tiny_flux.sample(patched, positive, negative, **sampling)
    run = plan_of(patched).telemetry.latest()
    assert run.executed_flops / run.full_flops == pytest.approx(result.final_ratio, rel=0.02)

    reference = tiny_flux.sample(sampling_through(flux_model, student), positive, negative, **sampling)
    full = tiny_flux.sample(flux_model, positive, negative, **sampling)
    assert (loaded - full).abs().max() > 1e-3
    torch.testing.assert_close(loaded, reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("spec, message", [
    (dict(parts=("tokens", "width")), "token routers are trained without width"),
    (dict(parts=("tokens",), ratio_regions=0), "ratio_regions >= 1"),
    (dict(parts=("tokens",), ratio_bins=1), "ratio_bins >= 2"),
    (dict(parts=("tokens",), min_keep=0.0), r"min_keep must be in \(0, 1\]"),
    (dict(parts=("tokens",), token_mode="mlp"), "token_mode must be one of diffcr, sdt"),
])
def test_bad_token_settings_are_refused_before_any_work(flux_model, bank, spec, message):
    with pytest.raises(ValueError, match=message):
        student_for(flux_model, bank, **spec)


def test_feature_distillation_is_refused_with_token_routing(flux_model, bank):
    student = student_for(flux_model, bank, parts=("tokens",))
    with pytest.raises(ValueError, match="feature distillation is not available with token routing"):
        train(student, bank, config(steps=2, feature_weight=1.0), progress_bar=False)



@pytest.mark.parametrize("mode", ["sdt"], indirect=True)
def test_sdt_runs_attention_for_every_token(trained, flux_model, bank):
    """At the same learned keep ratios SDT counts more FLOPs than DiffCR: every token still runs attention (that the
    counted FLOPs are what the Token Router's sdt mode runs is the file test's)."""
    student = trained[0]
    diffcr = student_for(flux_model, bank, parts=PARTS, ratio_regions=2)
    with torch.no_grad():
        diffcr["tokens"].ratio.copy_(student["tokens"].ratio)
    assert (student["tokens"].ratio < 1).any()
    assert schedule_ratio(student, bank) > schedule_ratio(diffcr, bank) + 0.05
