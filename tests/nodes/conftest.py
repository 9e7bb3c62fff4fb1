"""Every node test runs twice: as a library call, and the way ComfyUI's executor runs a prompt.

ComfyUI executes every prompt inside `torch.inference_mode()`, so the models its loader nodes
create hold inference tensors (no version counters, no in-place updates outside inference mode).
The `inference_mode` variant builds the test models and runs the whole test under it.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.demo import reference as reference_model
from support.session_models import session_model


@pytest.fixture(scope="session", params=["library", "inference_mode"])
def prompt_mode(request) -> str:
    return request.param


def _mode(prompt_mode: str):
    return torch.inference_mode() if prompt_mode == "inference_mode" else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def _as_comfyui_runs_prompts(prompt_mode):
    with _mode(prompt_mode):
        yield


@pytest.fixture(scope="session")
def flux_model(tiny_config, prompt_mode):
    with _mode(prompt_mode):
        model = reference_model.build_model(tiny_config)
    if prompt_mode == "inference_mode":
        assert next(model.model.diffusion_model.parameters()).is_inference()
    return session_model(model)


@pytest.fixture(scope="session")
def conds(tiny_config, prompt_mode):
    with _mode(prompt_mode):
        return tiny_flux.conditioning(tiny_config)
