"""The trainer on Chroma (modulations from its distilled network, handed to the blocks): through the adapter's capabilities alone, as on Wan."""
from __future__ import annotations

import pytest

from support.family_training import (
    token_router_file_round_trips,
    untrained_student_is_the_teacher_and_trains,
    width_files_round_trip,
)

from comfyui_dynamic_dit.demo import tiny_chroma
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def chroma():
    config = tiny_chroma.TinyChroma()
    model = tiny_chroma.build_model(config)
    conds = tiny_chroma.conditioning(config, text_tokens=6)
    latent = tiny_chroma.latent(8, 8)
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def sampler(chroma):
    model, (positive, negative), latent, _ = chroma
    return lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING)


def test_untrained_student_is_the_teacher_and_twenty_steps_train(chroma):
    untrained_student_is_the_teacher_and_trains(chroma[0], chroma[3], steps=20)


def test_files_round_trip_through_the_loaders_on_chroma(chroma, tmp_path):
    """Thinned heads and MLP groups with non-zero bypasses: the loaded files, sliced by the executor, sample what
    the student's masked forward samples."""
    width_files_round_trip(chroma[0], chroma[3], sampler(chroma), tmp_path, "tiny chroma")


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_chroma(chroma, tmp_path, mode):
    """DiffCR and SDT token routers on Chroma: with keep ratios below 1, the file run 'as trained' by the Token Router
    samples what the student's forward samples ."""
    token_router_file_round_trips(chroma[0], chroma[3], sampler(chroma), tmp_path, "tiny chroma", mode)
