"""Step attribution on synthetic call sequences, the way ComfyUI's samplers produce them."""
from dataclasses import dataclass

import pytest

from comfyui_dynamic_dit.core.steps import StepTracker, invert_decreasing

SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.0]
BATCHED = ("cond+uncond",)


@dataclass
class Rec:
    step: int | None = None


def run(tracker: StepTracker, events):
    """events: ("call", sigma[, key]) or ("cb", i); returns the call records' final steps."""
    records, seen = [], []
    for event in events:
        if event[0] == "cb":
            tracker.step_callback(event[1])
        else:
            rec = Rec()
            info = tracker.locate(event[1], event[2] if len(event) > 2 else BATCHED, rec)
            seen.append(info.step)
            records.append(rec)
    tracker.finish()
    return [r.step for r in records], seen


def test_euler_one_call_per_step():
    events = []
    for i, s in enumerate(SIGMAS[:-1]):
        events += [("call", s), ("cb", i)]
    final, seen = run(StepTracker(SIGMAS), events)
    assert final == seen == [0, 1, 2, 3]


def test_heun_second_evaluation_belongs_to_its_step():
    # sample_heun: model(sigma_i), callback(i), model(sigma_{i+1}) unless sigma_{i+1} == 0
    events = []
    for i, s in enumerate(SIGMAS[:-1]):
        events += [("call", s), ("cb", i)]
        if SIGMAS[i + 1] > 0:
            events.append(("call", SIGMAS[i + 1]))
    final, seen = run(StepTracker(SIGMAS), events)
    assert final == [0, 0, 1, 1, 2, 2, 3]
    # at call time a call is attributed to the step whose sigma it evaluates
    assert seen == [0, 1, 1, 2, 2, 3, 3]


def test_heun_with_cond_and_uncond_in_separate_calls():
    events = []
    for i, s in enumerate(SIGMAS[:-1]):
        events += [("call", s, "c"), ("call", s, "u"), ("cb", i)]
        if SIGMAS[i + 1] > 0:
            events += [("call", SIGMAS[i + 1], "c"), ("call", SIGMAS[i + 1], "u")]
    final, _ = run(StepTracker(SIGMAS), events)
    assert final == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3]


def test_midpoint_sampler_below_next_sigma():
    # DPM++ 2S ancestral: the midpoint evaluation can sit below the next step's sigma
    events = []
    for i, s in enumerate(SIGMAS[:-1]):
        events += [("call", s), ("cb", i)]
        if SIGMAS[i + 1] > 0:
            events.append(("call", SIGMAS[i + 1] * 0.9))
    final, _ = run(StepTracker(SIGMAS), events)
    assert final == [0, 0, 1, 1, 2, 2, 3]


def test_without_callbacks_sigma_decides():
    final, _ = run(StepTracker(SIGMAS), [("call", s) for s in SIGMAS[:-1]])
    assert final == [0, 1, 2, 3]


def test_churn_above_step_sigma_stays_in_step():
    events = [("call", 1.2), ("cb", 0), ("call", 0.85), ("cb", 1), ("call", 0.6), ("cb", 2)]
    final, _ = run(StepTracker(SIGMAS), events)
    assert final == [0, 1, 2]


def test_schedule_with_zeros_and_a_call_at_zero():
    sigmas = [1.0, 0.5, 0.0, 0.0]
    events = [("call", 1.0), ("cb", 0), ("call", 0.5), ("cb", 1), ("call", 0.0), ("cb", 2)]
    final, _ = run(StepTracker(sigmas), events)
    assert final == [0, 1, 2]


def test_empty_schedule_gives_no_step():
    rec = Rec(step=5)
    info = StepTracker([1.0]).locate(1.0, BATCHED, rec)
    assert info.step is None and rec.step is None and info.progress == 0.0


def test_percent_from_a_decreasing_schedule_function():
    def percent_to_sigma(p):
        return 1.0 - p  # flow-matching-like: sigma 1 at 0 %, 0 at 100 %

    assert invert_decreasing(percent_to_sigma, 0.25) == pytest.approx(0.75, abs=1e-6)
    assert invert_decreasing(percent_to_sigma, 2.0) == 0.0
    assert invert_decreasing(percent_to_sigma, -1.0) == 1.0
    tracker = StepTracker(SIGMAS, lambda s: invert_decreasing(percent_to_sigma, s))
    assert tracker.locate(0.6, BATCHED, Rec()).percent == pytest.approx(0.4, abs=1e-6)


# --- sigmas on an accelerator: no read per call --------------------------------------------------
def run_lazily(events, sigmas=SIGMAS):
    """Like `run`, with every call's sigma as a tensor the tracker must treat as living on a device."""
    import torch

    tracker = StepTracker(sigmas, free_read_devices=())
    records, seen = [], []
    for event in events:
        if event[0] == "cb":
            tracker.step_callback(event[1])
        else:
            rec = Rec()
            info = tracker.locate(torch.tensor([event[1]]), event[2] if len(event) > 2 else BATCHED, rec)
            seen.append(info.step)
            records.append(rec)
    reads_during_run = tracker.sigma_reads
    tracker.finish()
    return [r.step for r in records], seen, reads_during_run


@pytest.mark.parametrize("sampler", ["euler", "heun", "heun_split", "midpoint"])
def test_device_sigmas_are_read_only_before_the_first_callback_and_attribution_stays_exact(sampler):
    events = []
    for i, s in enumerate(SIGMAS[:-1]):
        if sampler == "heun_split":
            events += [("call", s, "c"), ("call", s, "u"), ("cb", i)]
            if SIGMAS[i + 1] > 0:
                events += [("call", SIGMAS[i + 1], "c"), ("call", SIGMAS[i + 1], "u")]
            continue
        events += [("call", s), ("cb", i)]
        if sampler == "heun" and SIGMAS[i + 1] > 0:
            events.append(("call", SIGMAS[i + 1]))
        if sampler == "midpoint" and SIGMAS[i + 1] > 0:
            events.append(("call", SIGMAS[i + 1] * 1.1))
    eager_final, eager_seen = run(StepTracker(SIGMAS), events)
    lazy_final, lazy_seen, reads = run_lazily(events)
    assert lazy_final == eager_final  # the exact attribution, made at the end
    assert reads == (2 if sampler == "heun_split" else 1)  # only the calls before the first callback
    if sampler != "midpoint":
        assert lazy_seen == eager_seen  # methods see the same steps as when every sigma is read
    else:  # a midpoint evaluation is treated as the next step's at call time
        assert lazy_seen == [0, 1, 1, 2, 2, 3, 3]


def test_device_sigmas_without_callbacks_are_read_at_every_call():
    final, seen, reads = run_lazily([("call", s) for s in SIGMAS[:-1]])
    assert final == seen == [0, 1, 2, 3] and reads == 4
