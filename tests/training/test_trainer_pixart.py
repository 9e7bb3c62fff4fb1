"""The trainer on PixArt-Σ (an EPS model whose blocks and model calls are reached through emulated patch points, the
student holding the call's options for its blocks as the server's wrapper point does): through the adapter's
capabilities alone, as on Wan."""
from __future__ import annotations

import pytest

from support.family_training import (
    token_router_file_round_trips,
    untrained_student_is_the_teacher_and_trains,
    width_files_round_trip,
)

from comfyui_dynamic_dit.demo import tiny_pixart
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def pixart():
    config = tiny_pixart.TinyPixArt()
    model = tiny_pixart.build_model(config)
    conds = tiny_pixart.conditioning(config, text_tokens=6)
    latent = tiny_pixart.latent(48, 48)
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="normal", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def sampler(pixart):
    model, (positive, negative), latent, _ = pixart
    return lambda m: tiny_flux.sample(m, positive, negative, latent=latent, scheduler="normal", **SAMPLING)


def test_untrained_student_is_the_teacher_and_twenty_steps_train(pixart):
    untrained_student_is_the_teacher_and_trains(pixart[0], pixart[3], steps=20)


def test_files_round_trip_through_the_loaders_on_pixart(pixart, tmp_path):
    """Thinned heads and MLP groups with non-zero bypasses: the loaded files, sliced by the executor, sample what
    the student's masked forward samples."""
    width_files_round_trip(pixart[0], pixart[3], sampler(pixart), tmp_path, "tiny pixart")


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_pixart(pixart, tmp_path, mode):
    """DiffCR and SDT token routers on PixArt: with keep ratios below 1, the file run 'as trained' by the Token Router
    samples what the student's forward samples."""
    token_router_file_round_trips(pixart[0], pixart[3], sampler(pixart), tmp_path, "tiny pixart", mode)
