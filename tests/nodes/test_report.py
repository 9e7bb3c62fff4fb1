import pytest
import torch

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.devtools.demo import run_node
from comfyui_dynamic_dit.nodes import NODE_CLASS_MAPPINGS
from support.nodes import node_outputs

Telemetry = NODE_CLASS_MAPPINGS["DynamicTelemetry"]
Report = NODE_CLASS_MAPPINGS["DynamicSpeedReport"]
TokenRouter = NODE_CLASS_MAPPINGS["DynamicTokenRouter"]


def sampled(model, conds, **settings):
    return {"samples": tiny_flux.sample(model, *conds, steps=3, seed=4, **settings)}


def test_report_of_a_full_compute_run(flux_model, conds):
    (model,) = node_outputs(Telemetry, flux_model)
    latent = sampled(model, conds)
    out = node_outputs(Report, model, latent)
    passthrough, table, chart = out["result"]
    assert passthrough is latent
    summary = out["ui"]["text"][0]
    assert summary.startswith("full compute, model time ") and "(a baseline for other runs) - 3 steps, 3 model calls" in summary
    lines = table.splitlines()
    assert lines[:3] == [summary, "", "```text"] and lines[3].split()[0] == "step" and lines[-1] == "```"
    assert len(lines) == 3 + 1 + 3 + 2 + 1  # summary, blank, fence, header, 3 steps, total and its note, fence
    assert chart.shape == (1, 540, 960, 3) and chart.dtype == torch.float32
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0
    # the node draws the chart from numbers: no squeezed image preview on the node
    assert "images" not in out["ui"]
    (data,) = out["ui"]["dynamic_dit_chart"]
    assert data["done"] and data["full_compute"] and len(data["steps"]) == 3 and data["summary"] == summary


def test_report_against_a_connected_baseline(flux_model, conds):
    (baseline,) = node_outputs(Telemetry, flux_model)
    model = run_node(TokenRouter, model=flux_model, keep_ratio_start=0.5, keep_ratio_end=0.5, first_full_blocks=0, last_full_blocks=0)
    base_latent = sampled(baseline, conds)
    latent = sampled(model, conds)
    out = node_outputs(Report, model, latent, baseline_model=baseline, baseline_latent=base_latent)
    summary, table = out["ui"]["text"][0], out["result"][1]
    assert " model time (" in summary and ("faster" in summary or "slower" in summary)
    assert "ms full" in table and "speedup" in table
    # columns that fit a text preview node (460 px: about 64 characters) without wrapping; what the methods did below
    rows = table.split("```text\n")[1].split("\n```")[0].splitlines()
    assert all(len(row) <= 60 for row in rows if not row.startswith(" " * 6)), rows
    assert rows[2].startswith(" " * 6) and "token_router" in rows[2], rows
    (data,) = out["ui"]["dynamic_dit_chart"]
    base_run = baseline.model_options["transformer_options"]["dynamic_dit"].telemetry.latest()
    assert data["baseline"]["run_id"] == base_run.run_id and len(data["baseline"]["steps"]) == 3


def test_connected_baseline_of_another_shape_is_named(flux_model, conds):
    (baseline,) = node_outputs(Telemetry, flux_model)
    (model,) = node_outputs(Telemetry, flux_model)
    sampled(baseline, conds, height=16, width=16)
    latent = sampled(model, conds)
    summary = node_outputs(Report, model, latent, baseline_model=baseline)["ui"]["text"][0]
    assert "the connected baseline has no finished run of this shape (latent [1, 16, 32, 32], 3 steps)" in summary


def test_without_a_connection_the_latest_full_compute_run_of_the_shape_is_the_baseline(flux_model, other_flux_model, conds):
    (baseline,) = node_outputs(Telemetry, flux_model)
    sampled(baseline, conds)
    model = run_node(TokenRouter, model=flux_model)
    latent = sampled(model, conds)
    summary = node_outputs(Report, model, latent)["ui"]["text"][0]
    assert "s full compute)" in summary and "(compared with the latest full-compute run of this shape" in summary


def test_report_explains_a_model_without_executor(flux_model):
    with pytest.raises(ValueError, match="no Dynamic DiT executor"):
        node_outputs(Report, flux_model, {"samples": torch.zeros(1, 16, 8, 8)})


def test_report_explains_a_baseline_without_executor(flux_model, conds):
    (model,) = node_outputs(Telemetry, flux_model)
    latent = sampled(model, conds)
    with pytest.raises(ValueError, match="baseline_model has no Dynamic DiT executor"):
        node_outputs(Report, model, latent, baseline_model=flux_model)


def test_report_explains_a_model_not_sampled_yet(flux_model):
    (model,) = node_outputs(Telemetry, flux_model)
    with pytest.raises(ValueError, match="no sampling run was recorded"):
        node_outputs(Report, model, {"samples": torch.zeros(1, 16, 8, 8)})


def test_the_report_says_how_close_the_image_stayed_when_both_images_are_connected(flux_model, conds):
    """PSNR and SSIM of this run's image against full compute's (ComfyUI IMAGE tensors, (B, H, W, C) in [0, 1])."""
    from comfyui_dynamic_dit.core.fidelity import psnr as bench_psnr
    from comfyui_dynamic_dit.nodes.report import fidelity_text

    (model,) = node_outputs(Telemetry, flux_model)
    latent = sampled(model, conds)
    full = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    close = (full + 0.01 * torch.randn(full.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    summary = node_outputs(Report, model, latent, image=close, baseline_image=full)["ui"]["text"][0]
    expected = bench_psnr(full.movedim(-1, 1), close.movedim(-1, 1))
    assert f"; {expected:.1f} dB PSNR, SSIM 0.9" in summary and "against full compute's image" in summary, summary
    assert fidelity_text(full, full) == "; identical to full compute's image" and "plain to see" not in summary
    far = (full + 0.2 * torch.randn(full.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)  # about 15 dB
    assert "under 20 dB the difference is plain to see" in fidelity_text(far, full), fidelity_text(far, full)
    assert fidelity_text(close, None) == "" and "no PSNR" in fidelity_text(full[:, :16], full)


def test_the_report_says_when_its_times_may_mislead(flux_model, conds, monkeypatch):
    """A baseline timed minutes before the run (ComfyUI answered it from its cache) is flagged, and so is a model too
    small for its time to follow its FLOPs; a fresh baseline of a large model is not."""
    from dataclasses import replace as copy

    from comfyui_dynamic_dit.integration.patching import plan_of
    from comfyui_dynamic_dit.nodes import report as report_node
    from comfyui_dynamic_dit.nodes.report import timing_caveat

    (baseline_model,) = node_outputs(Telemetry, flux_model)
    sampled(baseline_model, conds)
    model = run_node(TokenRouter, model=flux_model, keep_ratio_start=0.5, keep_ratio_end=0.5, first_full_blocks=0, last_full_blocks=0)
    sampled(model, conds)
    baseline, run = plan_of(baseline_model).telemetry.latest(), plan_of(model).telemetry.latest()
    assert "GFLOP per model call: on a model this small" in timing_caveat(run, baseline)  # the tiny Flux
    assert "timed" not in timing_caveat(run, baseline)
    stale = copy(baseline, started=baseline.started - 13 * 60)
    assert "the full-compute run was timed 13 min before this one" in timing_caveat(run, stale)
    monkeypatch.setattr(report_node, "SMALL_CALL_FLOPS", 1.0)  # as if the model were large
    assert timing_caveat(run, baseline) == ""
