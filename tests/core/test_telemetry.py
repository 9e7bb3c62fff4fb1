"""Run records: one-off setup apart from the steps, honest wording, the process-wide full-compute runs."""
import json
import math
import time
from dataclasses import dataclass
from typing import ClassVar

from comfyui_dynamic_dit.demo import tiny_flux
from comfyui_dynamic_dit.integration.patching import apply_settings, plan_of
from comfyui_dynamic_dit.core.flops import FlopBreakdown
from comfyui_dynamic_dit.core.method import REGISTRY, DynamicMethod
from comfyui_dynamic_dit.core.plan import MethodSettings
from comfyui_dynamic_dit.core.telemetry import CallRecord, RecentFullCompute, RunRecord

SETUP_SECONDS = 0.3


@dataclass(frozen=True)
class SetupOnceSettings(MethodSettings):
    method: ClassVar[str] = "test_setup_once"


class SetupOnce(DynamicMethod):
    """A method that does one-off work inside the first model call, as the width calibration does."""

    settings_type = SetupOnceSettings
    order = 1000

    def __init__(self, settings, run):
        super().__init__(settings, run)
        self.done = False

    def wrap_model_call(self, call, model_call, proceed):
        if not self.done:
            self.done = True
            time.sleep(SETUP_SECONDS)
            self.run.record.note_setup("test calibration", SETUP_SECONDS, 2e9, inside=call.record)
        return proceed(model_call)


def _run(seconds: list[float], executed: float = 1.0, full: float = 1.0, **fields) -> RunRecord:
    record = RunRecord(model="m", device="cpu", plan="p", latent_shape=(1, 16, 8, 8), total_steps=len(seconds), **fields)
    for i, s in enumerate(seconds):
        record.calls.append(CallRecord(i, i, 1.0 - i / len(seconds), ("cond",), 1, 16, FlopBreakdown(mlp=full),
                                       FlopBreakdown(mlp=executed), seconds=s, ran_model=True))
    record.finished = True
    return record


def test_setup_inside_a_step_is_reported_apart_from_it(flux_model, conds, monkeypatch):
    monkeypatch.setitem(REGISTRY, SetupOnceSettings.method, SetupOnce)
    model = apply_settings(flux_model, SetupOnceSettings())
    tiny_flux.sample(model, *conds, steps=3, seed=1)
    run = plan_of(model).telemetry.latest()
    first_call = run.calls[0]
    assert first_call.seconds >= SETUP_SECONDS  # measured around the whole call, setup included
    steps = run.steps()
    assert abs(steps[0].seconds - (first_call.seconds - SETUP_SECONDS)) < 1e-9
    assert abs(run.model_seconds - (sum(c.seconds for c in run.calls) - SETUP_SECONDS)) < 1e-9
    assert run.setup_seconds == SETUP_SECONDS and run.setup_flops == 2e9
    assert run.executed_flops == run.full_flops  # the setup's FLOPs are not charged to a step
    progress = run.progress()
    assert progress["setup"] == [{"name": "test calibration", "seconds": SETUP_SECONDS, "flops": 2e9}]
    assert progress["steps"][0]["ms"] == steps[0].seconds * 1e3 and progress["flops_reduction"] == 1.0
    assert "one-off setup 0.300 s, 2 GFLOP (test calibration)" in run.summary()
    setup_row, setup_note = run.table().splitlines()[1:3]
    assert setup_row.split()[:2] == ["setup", "2.000"] and "test calibration, once (inside model call 0)" in setup_note


def test_a_slowdown_is_called_slower():
    baseline = _run([0.49, 0.49])
    slower = _run([1.0, 1.0])
    assert "x2.04 slower model time (2.000 s vs 0.980 s full compute)" in slower.summary(baseline)
    assert "x2.04 faster model time" in baseline.summary(slower)


def test_more_flops_than_the_full_model_are_called_more():
    assert _run([1.0], executed=1.25).summary().startswith("x1.25 more FLOPs")


def test_summary_of_a_run_in_progress_compares_the_steps_done_so_far():
    baseline = _run([1.0, 1.0, 4.0])
    run = _run([0.5, 0.5, 0.5])
    run.finished = False
    assert run.summary(baseline, settled_steps=2).startswith("x1.00 fewer FLOPs, x2.00 faster model time (1.000 s vs 2.000 s")
    assert " - step 2/3, 2 model calls, " in run.summary(baseline, settled_steps=2)  # not the running step's call
    assert " - 3 steps, 3 model calls, " in run.summary(baseline)


def test_a_full_compute_run_says_it_is_the_baseline_not_x1_fewer_flops():
    baseline = _run([1.0, 1.0], full_compute=True)
    assert baseline.summary().startswith("full compute, model time 2.000 s (a baseline for other runs) - 2 steps")
    assert "fewer FLOPs" not in baseline.summary(settled_steps=1)


def test_recent_full_compute_runs_match_model_shape_and_steps():
    recent = RecentFullCompute(keep=4)
    same = _run([1.0, 1.0], full_compute=True)
    other_model = _run([1.0, 1.0], full_compute=True)
    other_model.model = "another"
    other_steps = _run([1.0, 1.0, 1.0], full_compute=True)
    for record in (same, other_model, other_steps):
        recent.add(record)
    assert recent.latest_comparable(_run([0.5, 0.5])) is same
    assert recent.latest_comparable(_run([0.5])) is None


def test_progress_is_strict_json_while_sigmas_are_unknown():
    # on an accelerator a call's sigma is NaN until the run ends; a browser's JSON.parse rejects NaN
    run = _run([1.0, 1.0], executed=0.0)
    for call in run.calls:
        call.sigma = math.nan
    data = json.loads(json.dumps(run.progress(baseline=_run([1.0, 1.0])), allow_nan=False))
    assert data["steps"][0]["sigma"] is None and data["flops_reduction"] is None
    assert data["baseline"]["steps"][1]["ms"] == 1000.0


def test_runs_of_one_shape_but_another_schedule_are_not_compared():
    """Wan 2.2's two experts: same class, size and latent, each sampling its half of the sigmas. The
    low-noise expert's run must not take the high-noise expert's full-compute run as its baseline."""
    high = _run([1.0, 1.0], schedule=(1.0, 0.9, 0.8))
    low_full = _run([1.0, 1.0], schedule=(0.8, 0.5, 0.0))
    low = _run([0.5, 0.5], schedule=(0.8, 0.5, 0.0))
    high.full_compute = low_full.full_compute = True
    sink = RecentFullCompute(keep=4)
    sink.add(low_full)
    sink.add(high)
    assert sink.latest_comparable(low) is low_full
    assert not low.comparable_to(high) and low.comparable_to(low_full)
    assert _run([1.0, 1.0]).comparable_to(high)  # a run recorded without a schedule compares by shape


def test_table_numbers_keep_their_columns_at_any_size():
    from comfyui_dynamic_dit.core.telemetry import _fit

    assert _fit(5.885, 3) == "  5.885" and _fit(1234.5678, 3) == "1234.57" and _fit(60000.4, 3) == "60000.4" and _fit(600000.4, 3) == " 600000"
    assert len(_fit(123456789.0, 2)) > 7  # past any width: the whole number, never cut
