"""Training DiffCR's token routers and per-layer, per-timestep keep ratios (with TD-LoRA as compensation) on the
tiny Flux: the student starts as the teacher, the loss falls at the target, the file reproduces the student in a
real sampling run through the Token Router, refusals."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from support.training import SAMPLING, sampling_through, student_for

from comfyui_dynamic_dit.devtools import tiny_flux
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import apply_settings, check_base_weights, plan_of
from comfyui_dynamic_dit.dynamic_core.comfy_integration.td_lora_files import apply_td_lora
from comfyui_dynamic_dit.dynamic_core.files import header_metadata
from comfyui_dynamic_dit.dynamic_core.methods.td_lora_file import load_td_lora_file
from comfyui_dynamic_dit.dynamic_core.methods.token_router import TokenRouterSettings
from comfyui_dynamic_dit.dynamic_core.methods.token_router_file import load_router_file
from comfyui_dynamic_dit.dynamic_core.training.export import save_student, training_metadata
from comfyui_dynamic_dit.dynamic_core.training.mutation import mutation_context
from comfyui_dynamic_dit.dynamic_core.training.trainer import TrainConfig, evaluate, schedule_ratio, train

TARGET = 0.6
PARTS = ("tokens", "td_lora")


def config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(target=TARGET, steps=50, batch=4, checkpoint_every=1000), **changes)


@pytest.fixture(scope="module")
def trained(flux_model, bank):
    student = student_for(flux_model, bank, parts=PARTS, ratio_regions=2)
    cfg = config()
    warm_end = cfg.compute_target().hold + cfg.compute_target().warmup
    result = train(student, bank, cfg, progress_bar=False)
    return student, result, warm_end


def test_untrained_student_is_the_teacher(flux_model, bank):
    student = student_for(flux_model, bank, parts=PARTS)
    batch = bank.fixed(8)
    with torch.no_grad():
        out, ratios = student(batch, noise=0.0)
    # every keep ratio 1 (full blocks, no router), bypasses zero: the teacher's output
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)
    assert schedule_ratio(student, bank) == pytest.approx(float(ratios[0])) and ratios.min() > 1.0  # the bypass costs
    routers_only = student_for(flux_model, bank, parts=("tokens",))
    with torch.no_grad():
        assert torch.equal(routers_only(batch, noise=0.0)[1], torch.ones(8))


def test_fifty_steps_meet_the_target_and_the_loss_falls(trained, flux_model, bank):
    student, result, warm_end = trained
    assert abs(result.final_ratio - TARGET) <= 0.05 * TARGET, result.final_ratio
    # the same learned ratios with untrained routers and no compensation: training won fidelity at that compute
    untrained = student_for(flux_model, bank, parts=PARTS, ratio_regions=2, seed=5)
    with torch.no_grad():
        untrained.tokens.ratio.copy_(student.tokens.ratio)
    assert schedule_ratio(untrained, bank) == pytest.approx(result.final_ratio)
    before = evaluate(untrained, bank, 16)
    assert result.eval_loss < 0.7 * before, (before, result.eval_loss)
    ratios = student.tokens.ratio.detach()
    assert ratios.min() >= student.spec.min_keep and ratios.max() <= 1.0


def test_the_ratio_has_a_gradient_through_the_bin_interpolation(flux_model, bank):
    """DiffCR's interpolation between ratio bins gives the distillation loss a gradient in every routed ratio."""
    student = student_for(flux_model, bank, parts=("tokens",), ratio_regions=1)
    with torch.no_grad():
        student.tokens.ratio.fill_(0.63)  # between the bins 0.60 and 0.65
    batch = bank.fixed(4)
    with mutation_context("allow"):  # the host's blocks write into their inputs
        out, ratios = student(batch)
        (out - batch["target"]).pow(2).mean().backward()
    grad = student.tokens.ratio.grad
    assert grad is not None and (grad.abs() > 0).all(), grad
    assert student.tokens.router_weight.grad.abs().sum() > 0
    # the differentiable FLOPs interpolate between the bins' exact counts
    exact = [student.routed_call_ratio(student.adapter.call_layout(student.arguments(batch)), torch.full((6,), r), grad=False)
             for r in (0.60, 0.65)]
    assert exact[0] < float(ratios[0].detach()) < exact[1]


def test_the_file_samples_what_the_student_computed(trained, flux_model, tmp_path):
    """The written token-router file (diffcr routers + ratios) and TD-LoRA file, loaded by the Token Router in its
    diffcr mode and the TD-LoRA loader, sample the image the student's forward gives, at the FLOPs it counted."""
    student, result, _ = trained
    metadata = training_metadata(student, target=TARGET, steps=result.steps, command="test", base_model="tiny")
    paths = save_student(student, tmp_path / "routed", metadata)
    assert sorted(p.name for p in paths) == ["routed.td_lora.safetensors", "routed.token_router.safetensors"]
    router_path = tmp_path / "routed.token_router.safetensors"
    check_base_weights(flux_model, header_metadata(router_path), router_path.name)
    router = load_router_file(router_path)
    assert router.router == "diffcr" and len(router.routers) == len(student.blocks)
    assert router.ratios.shape == (2, len(student.blocks))
    patched = apply_settings(flux_model, TokenRouterSettings.as_trained(router))
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
])
def test_bad_token_settings_are_refused_before_any_work(flux_model, bank, spec, message):
    with pytest.raises(ValueError, match=message):
        student_for(flux_model, bank, **spec)


def test_feature_distillation_is_refused_with_token_routing(flux_model, bank):
    student = student_for(flux_model, bank, parts=("tokens",))
    with pytest.raises(ValueError, match="feature distillation is not available with token routing"):
        train(student, bank, config(steps=2, feature_weight=1.0), progress_bar=False)

