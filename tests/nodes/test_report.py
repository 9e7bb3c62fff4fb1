import os

import pytest
import torch

import folder_paths

from comfyui_dynamic_dit.dynamic_core.comfy_integration import tiny_flux
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS

Telemetry = NODE_CLASS_MAPPINGS["DynamicTelemetry"]
Report = NODE_CLASS_MAPPINGS["DynamicSpeedReport"]


def sampled(model, conds, **settings):
    return {"samples": tiny_flux.sample(model, *conds, steps=3, seed=4, **settings)}


def test_report_of_a_run(flux_model, conds):
    (model,) = Telemetry().patch(flux_model)
    latent = sampled(model, conds)
    out = Report().report(model, latent)
    passthrough, table, chart = out["result"]
    assert passthrough is latent
    assert "x1.00 fewer FLOPs" in out["ui"]["text"][0]
    assert "no full-compute run of this shape" in out["ui"]["text"][0]
    lines = table.splitlines()
    assert lines[2].split()[0] == "step" and len(lines) == 3 + 3 + 1  # summary, blank, header, 3 steps, total
    assert chart.shape == (1, 540, 960, 3) and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0
    preview = out["ui"]["images"][0]
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), preview["filename"]))


def test_report_against_a_full_compute_baseline(flux_model, conds):
    (baseline,) = Telemetry().patch(flux_model)
    (model,) = Telemetry().patch(flux_model)
    base_latent = sampled(baseline, conds)
    latent = sampled(model, conds)
    out = Report().report(model, latent, baseline_model=baseline, baseline_latent=base_latent)
    summary, table = out["ui"]["text"][0], out["result"][1]
    assert "faster model time" in summary
    assert "ms full" in table and "speedup" in table


def test_baseline_of_another_shape_is_not_used(flux_model, conds):
    (baseline,) = Telemetry().patch(flux_model)
    (model,) = Telemetry().patch(flux_model)
    sampled(baseline, conds, height=16, width=16)
    latent = sampled(model, conds)
    out = Report().report(model, latent, baseline_model=baseline)
    assert "no full-compute run of this shape" in out["ui"]["text"][0]


def test_report_explains_a_model_without_executor(flux_model):
    with pytest.raises(ValueError, match="no Dynamic DiT executor"):
        Report().report(flux_model, {"samples": torch.zeros(1, 16, 8, 8)})


def test_report_explains_a_model_not_sampled_yet(flux_model):
    (model,) = Telemetry().patch(flux_model)
    with pytest.raises(ValueError, match="no sampling run was recorded"):
        Report().report(model, {"samples": torch.zeros(1, 16, 8, 8)})
