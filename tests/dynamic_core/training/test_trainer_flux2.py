"""The trainer on Flux 2 (shared modulation, SwiGLU units): through the adapter's capabilities alone, as on Wan."""
from __future__ import annotations

import pytest
import torch

from support.training import sampling_through

from comfyui_dynamic_dit.devtools import tiny_flux2
from comfyui_dynamic_dit.dynamic_core.comfy_integration import training_host
from comfyui_dynamic_dit.dynamic_core.comfy_integration.patching import apply_settings, check_base_weights
from comfyui_dynamic_dit.dynamic_core.comfy_integration.td_lora_files import apply_td_lora
from comfyui_dynamic_dit.dynamic_core.files import header_metadata
from comfyui_dynamic_dit.dynamic_core.methods.td_lora_file import load_td_lora_file
from comfyui_dynamic_dit.dynamic_core.methods.width import WidthSettings
from comfyui_dynamic_dit.dynamic_core.methods.width_file import load_width_router
from comfyui_dynamic_dit.dynamic_core.training.export import save_student, training_metadata
from comfyui_dynamic_dit.dynamic_core.training.student import StudentSpec
from comfyui_dynamic_dit.dynamic_core.training.trainer import TrainConfig, train

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def flux2():
    config = tiny_flux2.TinyFlux2()
    model = tiny_flux2.build_model(config)
    conds = tiny_flux2.conditioning(config, text_tokens=6)
    latent = tiny_flux2.latent(8, 8)
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def test_untrained_student_is_the_teacher_and_twenty_steps_train(flux2):
    model, _, _, bank = flux2
    student = training_host.build_student(model, bank, StudentSpec(experts=2, rank=2))
    batch = bank.fixed(4)
    with torch.no_grad():
        out, ratio = student(batch, noise=0.0)
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)
    assert torch.all(ratio > 1.0)  # full width plus the (zero) bypasses' FLOPs
    result = train(student, bank, TrainConfig(target=0.8, steps=20, batch=2, checkpoint_every=1000), progress_bar=False)
    assert result.steps == 20 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_files_round_trip_through_the_loaders_on_flux2(flux2, tmp_path):
    """Thinned heads and SwiGLU groups with non-zero bypasses: the loaded files, sliced by the executor, sample what
    the student's masked forward samples."""
    model, (positive, negative), latent, bank = flux2
    student = training_host.build_student(model, bank, StudentSpec(experts=2, rank=2), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # drop some units at every step, give the bypasses weight
        student.head_bias[:, ::2] = -5.0
        student.group_bias[:, 1::2] = -5.0
        for up in student.lora_up.values():
            up.copy_(torch.randn(up.shape, generator=generator) * 0.02)
    paths = save_student(student, tmp_path / "flux2", training_metadata(student, target=0.5, steps=0, command="test",
                                                                       base_model="tiny flux2"))
    for path in paths:
        check_base_weights(model, header_metadata(path), path.name)
    loaded = apply_td_lora(apply_settings(model, WidthSettings(router=load_width_router(paths[0]))), load_td_lora_file(paths[1]), 1.0)
    run = dict(latent=latent, **SAMPLING)
    full = tiny_flux2.sample(model, positive, negative, **run)
    reference = tiny_flux2.sample(sampling_through(model, student), positive, negative, **run)
    assert (reference - full).abs().max() > 1e-3
    torch.testing.assert_close(tiny_flux2.sample(loaded, positive, negative, **run), reference, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_flux2(flux2, tmp_path, mode):
    """DiffCR and SDT token routers on Flux 2: with keep ratios below 1, the file run 'as trained' by the Token Router
    samples what the student's forward samples (SDT: the single blocks' linear2 carries a token's MLP update)."""
    from comfyui_dynamic_dit.dynamic_core.methods.token_router import TokenRouterSettings
    from comfyui_dynamic_dit.dynamic_core.methods.token_router_file import load_router_file

    model, (positive, negative), latent, bank = flux2
    student = training_host.build_student(model, bank, StudentSpec(parts=("tokens",), token_mode=mode, ratio_regions=2), seed=1)
    with torch.no_grad():
        student.tokens.ratio.copy_(torch.tensor([[0.5], [0.75]]).expand_as(student.tokens.ratio))
    [path] = save_student(student, tmp_path / "flux2", training_metadata(student, target=0.8, steps=0, command="test",
                                                                         base_model="tiny flux2"))
    loaded = apply_settings(model, TokenRouterSettings.as_trained(load_router_file(path)))
    run = dict(latent=latent, **SAMPLING)
    reference = tiny_flux2.sample(sampling_through(model, student), positive, negative, **run)
    assert (reference - tiny_flux2.sample(model, positive, negative, **run)).abs().max() > 1e-3
    torch.testing.assert_close(tiny_flux2.sample(loaded, positive, negative, **run), reference, rtol=0, atol=1e-4)
