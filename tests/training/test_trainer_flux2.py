"""The trainer on Flux 2 (shared modulation, SwiGLU units): through the adapter's capabilities alone, as on Wan."""
from __future__ import annotations

import pytest

from support.family_training import (
    token_router_file_round_trips,
    untrained_student_is_the_teacher_and_trains,
    width_files_round_trip,
)

from comfyui_dynamic_dit.demo import tiny_flux2
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def flux2():
    config = tiny_flux2.TinyFlux2()
    model = tiny_flux2.build_model(config)
    conds = tiny_flux2.conditioning(config, text_tokens=6)
    latent = tiny_flux2.latent(8, 8)
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def sampler(flux2):
    model, (positive, negative), latent, _ = flux2
    return lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING)


def test_untrained_student_is_the_teacher_and_twenty_steps_train(flux2):
    untrained_student_is_the_teacher_and_trains(flux2[0], flux2[3], steps=20)


def test_files_round_trip_through_the_loaders_on_flux2(flux2, tmp_path):
    """Thinned heads and SwiGLU groups with non-zero bypasses: the loaded files, sliced by the executor, sample what
    the student's masked forward samples."""
    width_files_round_trip(flux2[0], flux2[3], sampler(flux2), tmp_path, "tiny flux2")


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_flux2(flux2, tmp_path, mode):
    """DiffCR and SDT token routers on Flux 2: with keep ratios below 1, the file run 'as trained' by the Token Router
    samples what the student's forward samples (SDT: the single blocks' linear2 carries a token's MLP update)."""
    token_router_file_round_trips(flux2[0], flux2[3], sampler(flux2), tmp_path, "tiny flux2", mode)
