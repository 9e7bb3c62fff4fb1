"""The hot path never stalls the host: with every method on, no host syncs and no host-built
tensors from the pack between the sampler's first step callback and the end of the run.

On an accelerator, reading a device value (`.item()`, `.tolist()`, `.cpu()`, `float(t)`, `bool(t)`)
waits for every queued kernel, and `torch.tensor(list, device=...)` copies from the host. On the CPU
those cost nothing, so the test counts the calls themselves, made from the pack's own code, with
the step tracker told to treat CPU sigmas like device ones.
"""
from __future__ import annotations

import sys
from typing import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from comfyui_dynamic_dit.core import steps as steps_module
from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import adapter_of, apply_settings, plan_of
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora, load_td_lora
from comfyui_dynamic_dit.core.executor import RunContext
from comfyui_dynamic_dit.methods.patch_scheduler.settings import PatchSchedulerSettings
from comfyui_dynamic_dit.methods.patch_scheduler.schedule import parse_schedule
from comfyui_dynamic_dit.methods.td_lora.binding import architecture_metadata, block_linear_shapes
from comfyui_dynamic_dit.methods.td_lora.file import random_td_lora, td_lora_state_dict
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.width.calibration import CalibrationSpec
from comfyui_dynamic_dit.methods.width.settings import WidthSettings

PACK_DIR = str(Path(steps_module.__file__).resolve().parents[1])  # the pack's root folder
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
BUILDERS = ("tensor", "as_tensor")


def _under_the_pack() -> bool:
    """Whether the pack's own code is anywhere on the stack (a host function the pack calls reads for it too)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PACK_DIR) and "/tests/" not in name:
            return True
        frame = frame.f_back
    return False


def _called_from_the_pack() -> bool:
    """Whether the nearest caller outside torch is the pack's own code (not the host's, not the test's)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(PACK_DIR) and "/tests/" not in frame.f_code.co_filename


class HostTraffic:
    """Counts device reads and host-built tensors from the pack while `active`."""

    def __init__(self, monkeypatch, counts: Callable[[], bool] = _called_from_the_pack):
        self.active = False
        self.seen: list[str] = []
        self.counts = counts
        for name in READS:
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in BUILDERS:
            self._wrap(monkeypatch, torch, name)

    def _wrap(self, monkeypatch, owner, name):
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.active and self.counts():
                caller = sys._getframe(1)
                self.seen.append(f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def after_the_first_step(monkeypatch, traffic: HostTraffic) -> HostTraffic:
    """`traffic` counting from the end of a run's first step callback (every later step is steady state) to the end of
    the run (reading results back is what the end of a run is for), CPU sigmas read the way device ones are."""
    monkeypatch.setattr(steps_module, "FREE_READ_DEVICES", ())
    callback, finish = RunContext.step_callback, RunContext.finish

    def step_callback(self, step, latent):
        callback(self, step, latent)
        traffic.active = True

    def finish_run(self):
        traffic.active = False
        return finish(self)

    monkeypatch.setattr(RunContext, "step_callback", step_callback)
    monkeypatch.setattr(RunContext, "finish", finish_run)
    return traffic


@pytest.fixture(params=["reuse", "sdt", "diffcr"])
def every_method(flux_model, request):
    """Width (a ramp: other heads and groups at every step), Token Router, TD-LoRA K=3 and the Patch
    Scheduler (manual), all on one model."""
    adapter = adapter_of(flux_model)
    layers, gate = random_td_lora(block_linear_shapes(adapter, flux_model.model.diffusion_model), experts=3, rank=4, seed=5)
    state, metadata = td_lora_state_dict(layers, architecture_metadata(adapter), gate)
    model = apply_td_lora(flux_model, load_td_lora(flux_model, state, metadata, "k3.safetensors"), 1.0)
    model = apply_settings(model, WidthSettings(noisy_width=0.25, clean_width=1.0,  # a new decision at every step
                                                calibration=replace(CalibrationSpec(), percents=(0.0, 0.5), latent_size=(8, 8))))
    model = apply_settings(model, TokenRouterSettings(mode=request.param, keep_start=0.5, keep_end=0.5, first_full=1, last_full=1))
    return apply_settings(model, PatchSchedulerSettings(mode="manual", schedule=parse_schedule("50-75%:2")))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_no_host_syncs_or_host_built_tensors_after_the_first_step(every_method, conds, monkeypatch, sampler):
    traffic = after_the_first_step(monkeypatch, HostTraffic(monkeypatch))
    tiny_flux.sample(every_method, *conds, steps=6, cfg=2.0, sampler=sampler, seed=3)
    run = plan_of(every_method).telemetry.latest()
    described = " ".join(text for step in run.steps() for text in step.methods.values())
    assert "patch 2x" in described and " keep 0.5" in described and "heads 0.2" in described and "K=3" in described
    assert traffic.seen == []


def test_an_eps_model_reads_nothing_for_the_pack_after_the_first_step(monkeypatch):
    """PixArt-Σ (an EPS model): the pack turns sigmas into sampling percents through the host's discrete sigma table,
    ~40 lookups with a read each per sigma. Every read the pack causes, in its code or in the host's it calls, happens
    before the first step (the schedule's percents are taken at the run's start), none in the steps."""
    from comfyui_dynamic_dit.demo import tiny_pixart

    config = tiny_pixart.TinyPixArt()
    model = tiny_pixart.build_model(config)
    model = apply_settings(model, TokenRouterSettings(mode="reuse", keep_start=0.5, keep_end=0.5, first_full=1, last_full=1))
    traffic = after_the_first_step(monkeypatch, HostTraffic(monkeypatch, counts=_under_the_pack))
    tiny_flux.sample(model, *tiny_pixart.conditioning(config), latent=tiny_pixart.latent(), steps=5, cfg=2.0,
                       scheduler="normal", seed=3)
    described = " ".join(text for step in plan_of(model).telemetry.latest().steps() for text in step.methods.values())
    assert "keep 0.5" in described
    assert traffic.seen == []
