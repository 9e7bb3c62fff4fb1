"""Dynamic Speed Report: the per-step table, a chart and the summary line of the last run."""
from __future__ import annotations

import numpy as np
import torch

from comfy_api.latest import io

from ..core.chart import render_chart
from ..core.fidelity import psnr, ssim
from ..integration.node_schema import node_schema
from ..integration.patching import plan_of
from ..core.telemetry import RECENT_FULL_COMPUTE, RunRecord, find_baseline


CATEGORY = "dynamic_dit/report"


def _image_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _baseline_for(run: RunRecord, baseline_model) -> tuple[RunRecord | None, str]:
    """The connected baseline's comparable run, or without a connection the latest comparable
    full-compute run of this process; and a note when the comparison is not the connected one."""
    if baseline_model is not None:
        baseline_plan = plan_of(baseline_model)
        if baseline_plan is None:
            raise ValueError(
                "Dynamic Speed Report: the baseline_model has no Dynamic DiT executor. Put 'Dynamic Telemetry' "
                "between the loader and the baseline's sampler and connect its MODEL."
            )
        found = find_baseline(run, [baseline_plan.telemetry])
        if found is None:
            return None, (
                "the connected baseline has no finished run of this shape "
                f"(latent {list(run.latent_shape)}, {run.total_steps} steps): sample it with the same size and steps"
            )
        return found, ""
    if run.full_compute:  # the baseline itself
        return None, ""
    found = RECENT_FULL_COMPUTE.latest_comparable(run)
    return found, "compared with the latest full-compute run of this shape (no baseline connected)" if found else ""


STALE_SECONDS = 60.0  # a baseline that ended this long before the run began is from an earlier prompt
SMALL_CALL_FLOPS = 1e11  # below this per model call, a CPU's time follows overheads more than FLOPs


def timing_caveat(run: RunRecord, baseline: RunRecord | None) -> str:
    """Why the model-time comparison may mislead, or '': a baseline timed well before this run (ComfyUI reuses a
    sampler's cached output, so the baseline did not run again), or a model too small for time to follow FLOPs."""
    caveats = []
    if baseline is not None and not run.full_compute:
        gap = run.started - (baseline.started + baseline.model_seconds)
        if gap > STALE_SECONDS:
            caveats.append(f"the full-compute run was timed {gap / 60:.0f} min before this one (ComfyUI reused its cached "
                           "result): times taken apart differ when the machine's load does")
    calls = max(len(run.calls), 1)
    if run.full_flops / calls < SMALL_CALL_FLOPS:
        caveats.append(f"{run.full_flops / calls / 1e9:.2g} GFLOP per model call: on a model this small, time follows "
                       "overheads more than FLOPs; large models' time follows FLOPs (BENCHMARKS.md)")
    return "; ".join(caveats)


VISIBLE_PSNR = 20.0  # dB: below it (the Train node's 100-step files gave 17 dB) blocks and shifted colours show


def fidelity_text(image, baseline_image) -> str:
    """'; 24.4 dB PSNR, SSIM 0.83 against full compute's image' when both images are connected, else ''."""
    if image is None or baseline_image is None:
        return ""
    if tuple(image.shape) != tuple(baseline_image.shape):
        return f"; images of other sizes ({list(image.shape)} vs {list(baseline_image.shape)}): no PSNR"
    ours, theirs = image.movedim(-1, 1).float(), baseline_image.movedim(-1, 1).float()  # (B, H, W, C) -> (B, C, H, W)
    value = psnr(theirs, ours)
    if value == float("inf"):
        return "; identical to full compute's image"
    text = f"{value:.1f} dB PSNR"
    if min(ours.shape[-2:]) >= 11:  # SSIM's window
        text += f", SSIM {ssim(theirs, ours):.3f}"
    warning = (f" - under {VISIBLE_PSNR:g} dB the difference is plain to see: a gentler setting, or for a trained file "
               "more training steps" if value < VISIBLE_PSNR else "")
    return f"; {text} against full compute's image{warning}"


class DynamicSpeedReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return node_schema(
            "DynamicSpeedReport", "Dynamic Speed Report", CATEGORY,
            "Shows what the last sampling run of a Dynamic DiT model computed: per step the FLOPs executed "
            "next to the full model's, the model time, and what every method did. Connect a full-compute run "
            "(a model through 'Dynamic Telemetry' with no method on, same seed and size) as baseline to see "
            "the measured speedup. The node shows the summary and a per-step chart (live while sampling); "
            "the 'table' output has every step in detail (connect it to 'Preview as Text').",
            [
                io.Model.Input("model", tooltip="The model that went into the sampler (after the Dynamic DiT nodes)."),
                io.Latent.Input("latent", tooltip="The sampler's output; passed through, and makes the report run after sampling."),
                io.Model.Input("baseline_model", optional=True,
                               tooltip="A full-compute model through 'Dynamic Telemetry', sampled with the same settings."),
                io.Latent.Input("baseline_latent", optional=True, tooltip="The baseline sampler's output, so the baseline runs first."),
                io.Image.Input("image", optional=True,
                               tooltip="This run's decoded image: with baseline_image, the report shows PSNR and SSIM."),
                io.Image.Input("baseline_image", optional=True,
                               tooltip="The full-compute run's decoded image, to measure how close this one stays."),
            ],
            [
                io.Latent.Output(display_name="latent", tooltip="The sampler's LATENT, unchanged."),
                io.String.Output(display_name="table",
                                 tooltip="The per-step table (FLOPs, model ms, speedup, what each method did) as text."),
                io.Image.Output(display_name="chart", tooltip="The per-step chart as an image."),
            ],
            output_node=True,
            search_aliases=["speedup", "speed", "benchmark", "FLOPs", "chart", "telemetry", "report", "PSNR"],
        )

    @classmethod
    def execute(cls, model, latent, baseline_model=None, baseline_latent=None, image=None, baseline_image=None) -> io.NodeOutput:
        plan = plan_of(model)
        if plan is None:
            raise ValueError(
                "Dynamic Speed Report: this model has no Dynamic DiT executor. Connect the MODEL that went into "
                "the sampler after a Dynamic DiT node (or 'Dynamic Telemetry')."
            )
        run = plan.telemetry.latest()
        if run is None:
            raise ValueError(
                "Dynamic Speed Report: no sampling run was recorded for this model yet. Connect the sampler's "
                "LATENT output so the report runs after it."
            )
        baseline, note = _baseline_for(run, baseline_model)
        notes = [n for n in (note, timing_caveat(run, baseline)) if n]
        summary = run.summary(baseline) + fidelity_text(image, baseline_image) + "".join(f" ({n})" for n in notes)
        # Markdown: text displays such as 'Preview as Text' render the tables as aligned monospace blocks.
        text = "\n\n".join([summary] + [f"```text\n{table}\n```" for table in (run.table(baseline), run.block_table()) if table])
        chart = render_chart(run, baseline)
        # The node draws the chart itself from these numbers (readable at any node size); the
        # chart image is an output for saving or previewing.
        return io.NodeOutput(latent, text, _image_tensor(chart), ui={
            "text": [summary], "dynamic_dit_chart": [run.progress(baseline=baseline) | {"summary": summary}]})


NODE_CLASS_MAPPINGS = {"DynamicSpeedReport": DynamicSpeedReport}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicSpeedReport": "Dynamic Speed Report"}
