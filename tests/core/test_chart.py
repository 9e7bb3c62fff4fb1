"""The chart image: per-step bars on axes, the full-compute baseline next to them, the setup apart."""
import numpy as np
import pytest

from comfyui_dynamic_dit.core.chart import BASELINE_COLOR, FLOPS_COLOR, RUN_COLOR, SETUP_COLOR, nice_ticks, render_progress


def _data(baseline: bool, setup: bool) -> dict:
    steps = [{"step": i, "ms": 10.0 + i, "flops_ratio": 0.5} for i in range(8)]
    return {
        "summary": "x2.00 fewer FLOPs, x1.50 faster model time",
        "total_steps": 8,
        "steps": steps,
        "setup": [{"name": "width calibration", "seconds": 0.5, "flops": 1e9}] if setup else [],
        "baseline": {"steps": [{"step": i, "ms": 20.0, "flops_ratio": 1.0} for i in range(8)]} if baseline else None,
    }


def _pixels(image, color) -> int:
    return int(np.all(np.asarray(image) == np.array(color, dtype=np.uint8), axis=-1).sum())


def test_baseline_bars_are_drawn_only_with_a_baseline():
    with_baseline = render_progress(_data(baseline=True, setup=False), 480, 300)
    without = render_progress(_data(baseline=False, setup=False), 480, 300)
    assert _pixels(with_baseline, BASELINE_COLOR) > 500 and _pixels(without, BASELINE_COLOR) < 50  # < 50: legend only
    for image in (with_baseline, without):
        assert _pixels(image, RUN_COLOR) > 300 and _pixels(image, FLOPS_COLOR) > 300


def test_setup_gets_its_own_bar_and_does_not_flatten_the_steps():
    image = render_progress(_data(baseline=False, setup=True), 960, 540)
    assert _pixels(image, SETUP_COLOR) > 300
    plain = render_progress(_data(baseline=False, setup=False), 960, 540)
    # the steps' axis is scaled to the steps (the 500 ms setup is clipped), so their bars keep their height
    assert _pixels(image, RUN_COLOR) > 0.8 * _pixels(plain, RUN_COLOR)


def test_empty_run_says_so():
    image = render_progress({"summary": "", "steps": [], "total_steps": 4}, 480, 300)
    assert _pixels(image, RUN_COLOR) == 0


def test_nice_ticks():
    assert nice_ticks(13.0, 4) == [0, 5, 10, 15]
    assert nice_ticks(0.8, 4) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert nice_ticks(0.0) == [0.0, 1.0]
