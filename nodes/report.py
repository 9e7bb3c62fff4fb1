"""Dynamic Speed Report: the per-step table, a chart and the summary line of the last run."""
from __future__ import annotations

import numpy as np
import torch

from ..dynamic_core.chart import render_chart
from ..dynamic_core.comfy_integration.patching import plan_of, save_preview
from ..dynamic_core.telemetry import find_baseline

CATEGORY = "dynamic_dit"


def _image_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


class DynamicSpeedReport:
    DESCRIPTION = (
        "Shows what the last sampling run of a Dynamic DiT model computed: per step the FLOPs executed "
        "next to the full model's, the model time, and what every method did. Connect a full-compute run "
        "(a model through 'Dynamic Telemetry' with no method on, same seed and size) as baseline to see "
        "the measured speedup."
    )
    CATEGORY = CATEGORY
    FUNCTION = "report"
    OUTPUT_NODE = True
    RETURN_TYPES = ("LATENT", "STRING", "IMAGE")
    RETURN_NAMES = ("latent", "table", "chart")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model that went into the sampler (after the Dynamic DiT nodes)."}),
                "latent": ("LATENT", {"tooltip": "The sampler's output; passed through, and makes the report run after sampling."}),
            },
            "optional": {
                "baseline_model": ("MODEL", {"tooltip": "A full-compute model through 'Dynamic Telemetry', sampled with the same settings."}),
                "baseline_latent": ("LATENT", {"tooltip": "The baseline sampler's output, so the baseline runs first."}),
            },
        }

    def report(self, model, latent, baseline_model=None, baseline_latent=None):
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
        baseline_plan = plan_of(baseline_model) if baseline_model is not None else None
        baseline = find_baseline(run, [baseline_plan.telemetry]) if baseline_plan is not None else None
        summary = run.summary(baseline)
        text = "\n\n".join(part for part in (summary, run.table(baseline), run.block_table()) if part)
        chart = render_chart(run, baseline)
        return {
            "ui": {"text": [summary], "images": save_preview(chart)},
            "result": (latent, text, _image_tensor(chart)),
        }


NODE_CLASS_MAPPINGS = {"DynamicSpeedReport": DynamicSpeedReport}
NODE_DISPLAY_NAME_MAPPINGS = {"DynamicSpeedReport": "Dynamic Speed Report"}
