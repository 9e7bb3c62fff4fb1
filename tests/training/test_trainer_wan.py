"""The trainer is family-agnostic: on a tiny Wan 2.1 T2V it works through the adapter's capabilities alone
(recorded arguments by the host's names, unit columns, linear sizes, the block runner)."""
from __future__ import annotations

import pytest

from support.family_training import (
    token_router_file_round_trips,
    untrained_student_is_the_teacher_and_trains,
    width_files_round_trip,
)

from comfyui_dynamic_dit.demo import tiny_wan
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host

SAMPLING = dict(steps=4, cfg=2.0)


@pytest.fixture(scope="module")
def wan():
    config = tiny_wan.TinyWan()
    model = tiny_wan.build_model(config)
    conds = tiny_wan.conditioning(config, text_tokens=6)
    latent = tiny_wan.latent(config, video_frames=5, height=8, width=8)  # 2 latent frames of 4x4 tokens
    bank = training_host.record_trajectories(model, [conds], latent, sampler="euler", scheduler="simple", seeds=[0], **SAMPLING)
    return model, conds, latent, bank


def sampler(wan):
    model, (positive, negative), latent, _ = wan
    return lambda m: tiny_flux.sample(m, positive, negative, latent=latent, **SAMPLING)


def test_untrained_student_is_the_teacher_and_trains(wan):
    model, _, _, bank = wan
    assert bank.rows == 4 * 2 and len(bank.timesteps) == 4  # cond and uncond per step
    untrained_student_is_the_teacher_and_trains(model, bank, steps=3)


def test_files_round_trip_through_the_loaders_on_wan(wan, tmp_path):
    """Thinned heads and FFN groups with non-zero bypasses: the loaded files, sliced by the executor, sample
    what the student's masked forward samples."""
    width_files_round_trip(wan[0], wan[3], sampler(wan), tmp_path, "tiny wan")


def test_sdt_token_routers_round_trip_on_wan(wan, tmp_path):
    """SDT token routers on Wan (the FFN output carries a token's MLP update, `mlp_token_gates`): with routers and
    keep ratios below 1, the file run 'as trained' by the Token Router samples what the student's forward samples."""
    assert token_router_file_round_trips(wan[0], wan[3], sampler(wan), tmp_path, "tiny wan", "sdt") == "dydit"
