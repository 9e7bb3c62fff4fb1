"""The teacher's recorded runs of the tiny Flux, shared by the trainer tests."""
from __future__ import annotations

import pytest
from support.training import LATENT, SAMPLING

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration import training_host


@pytest.fixture(scope="module")
def bank(flux_model, tiny_config):
    jobs = [tiny_flux.conditioning(tiny_config, seed=s) for s in range(2)]
    return training_host.record_trajectories(flux_model, jobs, LATENT, seeds=[0], **SAMPLING)
