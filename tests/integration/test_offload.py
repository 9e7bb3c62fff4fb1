"""Low-VRAM loading (every weight offloaded, cast per call): width and routing stay exact, move fewer
weight bytes than full compute, and keep nothing but small index tensors between calls."""
from dataclasses import replace

import pytest
import torch

import comfy.model_management

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import apply_settings, install_executor, plan_of
from comfyui_dynamic_dit.core.executor import RunContext
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.width.calibration import CalibrationSpec
from comfyui_dynamic_dit.methods.width.settings import WidthSettings

SAMPLE = dict(steps=4, cfg=2.0, seed=5)
SMALL = replace(CalibrationSpec(), percents=(0.0,), latent_size=(8, 8))


def dynamic(model):
    model = apply_settings(model, WidthSettings(noisy_width=0.5, clean_width=0.5, calibration=SMALL))
    return apply_settings(model, TokenRouterSettings(mode="diffcr", keep_start=0.5, keep_end=0.5, first_full=1, last_full=1))


@pytest.fixture
def weight_bytes_cast(monkeypatch):
    """Bytes of weights the host's cast moves or converts (comfy.model_management.cast_to), per run."""
    moved = []
    cast_to = comfy.model_management.cast_to

    def counting(weight, *args, **kwargs):
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            moved[-1] += weight.numel() * weight.element_size()
        return cast_to(weight, *args, **kwargs)

    monkeypatch.setattr(comfy.model_management, "cast_to", counting)
    return moved


def test_offloaded_width_and_routing_are_exact_and_move_fewer_bytes(flux_model, conds, lowvram_loading, weight_bytes_cast):
    kept = []
    finish = RunContext.finish

    def record_index_memory(self):
        entries = self.indices._entries.values()
        tensors = [t for e in entries for s in vars(e).values() if hasattr(s, "_index") for t in s._index.values()]
        kept.append(sum(t.numel() * t.element_size() for t in tensors))
        return finish(self)

    weight_bytes_cast.append(0)
    reduced_model = dynamic(flux_model)
    tiny_flux.sample(reduced_model, *conds, **SAMPLE)  # the one-off width calibration, cached for these weights
    weight_bytes_cast[:] = [0]
    full = tiny_flux.sample(install_executor(flux_model), *conds, **SAMPLE)
    weight_bytes_cast.append(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunContext, "finish", record_index_memory)
        offloaded = tiny_flux.sample(reduced_model, *conds, **SAMPLE)
    full_bytes, reduced_bytes = weight_bytes_cast
    assert full_bytes > 0 and reduced_bytes < 0.85 * full_bytes  # kept rows/columns are narrowed before the cast
    run = plan_of(reduced_model).telemetry.latest()
    assert run.executed_flops < 0.8 * run.full_flops
    model_bytes = sum(p.numel() * p.element_size() for p in flux_model.model.diffusion_model.parameters())
    assert kept and kept[0] < 0.01 * model_bytes  # between calls: index tensors only, no weight copies

    comfy.model_management.unload_all_models()
    loaded = tiny_flux.sample(dynamic(flux_model), *conds, **SAMPLE)  # the same settings, fully loaded
    torch.testing.assert_close(offloaded, loaded, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(offloaded, full, atol=1e-3)
