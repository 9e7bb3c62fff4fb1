"""The trainer on Z-Image (its blocks reached through the patch points the pack emulates on their forward): through the adapter's capabilities alone, as on Wan."""
from __future__ import annotations

import pytest

from support.family_training import (
    token_router_file_round_trips,
    untrained_student_is_the_teacher_and_trains,
    width_files_round_trip,
)

from comfyui_dynamic_dit.demo import tiny_z_image
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def z_image():
    config = tiny_z_image.TinyZImage()
    model = tiny_z_image.build_model(config)
    conds = tiny_z_image.conditioning(config, text_tokens=6)
    latent = tiny_z_image.latent(8, 8)
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def sampler(z_image):
    model, (positive, negative), latent, _ = z_image
    return lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING)


def test_untrained_student_is_the_teacher_and_twenty_steps_train(z_image):
    untrained_student_is_the_teacher_and_trains(z_image[0], z_image[3], steps=20)


def test_files_round_trip_through_the_loaders_on_z_image(z_image, tmp_path):
    """Thinned heads and MLP groups with non-zero bypasses: the loaded files, sliced by the executor, sample what
    the student's masked forward samples."""
    width_files_round_trip(z_image[0], z_image[3], sampler(z_image), tmp_path, "tiny z-image")


@pytest.mark.parametrize("mode", ["diffcr", "sdt"])
def test_token_routers_round_trip_on_z_image(z_image, tmp_path, mode):
    """DiffCR and SDT token routers on Z-Image: with keep ratios below 1, the file run 'as trained' by the Token Router
    samples what the student's forward samples ."""
    token_router_file_round_trips(z_image[0], z_image[3], sampler(z_image), tmp_path, "tiny z-image", mode)
