"""The trainer on LTX-Video (a video model whose blocks carry per-token RoPE tables over the full width and update their
input in place, and whose calls carry a frame rate): width, token routers and TD-LoRA through the adapter's
capabilities alone, as on Wan."""
from __future__ import annotations

import pytest
import torch

from support.family_training import token_router_file_round_trips, untrained_student_is_the_teacher_and_trains, width_files_round_trip

from comfyui_dynamic_dit.demo import tiny_flux, tiny_ltxv
from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.training.student import StudentSpec
from comfyui_dynamic_dit.training.trainer import TrainConfig, train

SAMPLING = dict(steps=4, cfg=3.0)


@pytest.fixture(scope="module")
def ltxv():
    config = tiny_ltxv.TinyLTXV()
    model = tiny_ltxv.build_model(config)
    conds = tiny_ltxv.conditioning(config, text_tokens=6)
    latent = tiny_ltxv.latent()
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def test_untrained_student_is_the_teacher_and_twenty_steps_train_token_routers_with_td_lora(ltxv):
    model, _, _, bank = ltxv
    student = training_host.build_student(model, bank, StudentSpec(parts=("tokens", "td_lora"), experts=2, rank=2))
    batch = bank.fixed(4)
    with torch.no_grad():
        out, _ = student(batch, noise=0.0)
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)
    result = train(student, bank, TrainConfig(target=0.8, steps=20, batch=2, checkpoint_every=1000), progress_bar=False)
    assert result.steps == 20 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.final_ratio < 0.95  # the routers learned to leave tokens out


def test_untrained_student_is_the_teacher_and_twenty_steps_train_width_with_td_lora(ltxv):
    untrained_student_is_the_teacher_and_trains(ltxv[0], ltxv[3], steps=20)


def test_width_files_round_trip_on_ltxv(ltxv, tmp_path):
    """Thinned heads and feed-forward groups with non-zero bypasses: the loaded files, sliced by the executor (kept heads'
    RoPE channels included), sample what the student's masked forward samples."""
    model, (positive, negative), latent, bank = ltxv
    width_files_round_trip(model, bank, lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING),
                           tmp_path, "tiny ltxv")


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_ltxv(ltxv, tmp_path, mode):
    """With keep ratios below 1, the file run 'as trained' by the Token Router samples what the student samples."""
    model, (positive, negative), latent, bank = ltxv
    sample = lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING)  # noqa: E731
    token_router_file_round_trips(model, bank, sample, tmp_path, "tiny ltxv", mode)
