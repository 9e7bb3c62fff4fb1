"""Per-call and per-step records of what a sampling run computed, and how long it took.

A CallRecord per model call (step, sigma, cond/uncond chunks, what each method did, the FLOPs executed next to
the unpatched model's, wall time); a RunRecord per run, by sampling step, against a full-compute run of the same
shape when there is one. One-off setup work (`RunRecord.note_setup`) is reported apart from the steps.
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .flops import ZERO, FlopBreakdown


@dataclass
class CallRecord:
    index: int
    step: int | None
    sigma: float
    chunks: tuple[str, ...]  # "cond" / "uncond" per batch chunk
    batch: int
    image_tokens: int  # native image tokens of the call
    full: FlopBreakdown  # what the unpatched model would have executed
    executed: FlopBreakdown = ZERO
    seconds: float = 0.0
    # method -> what it did in this call; a callable is a text made from device values, formatted
    # when the run ends (formatting it during the run would stall the host)
    methods: dict[str, str | Callable[[], str]] = field(default_factory=dict)
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)  # block label -> metric -> value
    ran_model: bool = False  # False when something (e.g. EasyCache) skipped the model entirely
    timer: Any = None  # (start, end) accelerator events until `seconds` is read from them

    def note_block(self, label: str, metric: str, value: float) -> None:
        self.blocks.setdefault(label, {})[metric] = value

    def resolve(self, wait: bool) -> bool:
        """Fill `seconds` from the timer events once they have completed (waiting for them if `wait`).
        Returns whether the call's time is known."""
        if self.timer is None:
            return True
        start, end = self.timer
        if wait:
            end.synchronize()
        elif not end.query():
            return False
        self.seconds = start.elapsed_time(end) / 1e3
        self.timer = None
        return True

    def format_methods(self) -> None:
        """Turn the texts made from device values into strings (once the run has ended)."""
        for name, text in self.methods.items():
            if callable(text):
                self.methods[name] = text()


@dataclass
class SetupRecord:
    """One-off work of a run that belongs to no sampling step (a calibration, a cache warm-up)."""

    name: str
    seconds: float
    flops: float
    call_index: int | None = None  # the model call whose measured time contains this work, if any


@dataclass
class StepRecord:
    step: int | None
    sigma: float
    calls: int
    executed: float
    full: float
    seconds: float
    methods: dict[str, str]
    ran_model: bool = True  # False when every call of the step was answered without the model

    @property
    def flops_ratio(self) -> float:
        return self.executed / self.full if self.full else 1.0


LATEST = "latest"  # RunRecord.progress: compare with the latest comparable full-compute run


def _ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        return math.inf if numerator > 0 else 1.0
    return numerator / denominator


@dataclass
class RunRecord:
    """One sampling run of a patched model."""

    model: str
    device: str
    plan: str
    latent_shape: tuple[int, ...]
    total_steps: int
    started: float = field(default_factory=time.time)
    calls: list[CallRecord] = field(default_factory=list)
    finished: bool = False
    setup: list[SetupRecord] = field(default_factory=list)
    full_compute: bool = False  # every method off: a baseline for other runs of its shape
    # The sampler's sigmas (rounded): runs of one shape but another schedule are not compared, e.g. the
    # high- and low-noise experts of Wan 2.2 (same class and size, each sampling its half of the steps).
    schedule: tuple[float, ...] = ()
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    # --- one-off setup work -------------------------------------------------------------------
    def note_setup(self, name: str, seconds: float, flops: float = 0.0, inside: CallRecord | None = None) -> SetupRecord:
        """Record one-off work (`name`, e.g. "width calibration") apart from the sampling steps.

        `inside`: the model call it ran in, whose measured time contains `seconds`; that time is taken
        out of the call's step. Its FLOPs must not also be added to the call's executed FLOPs.
        """
        record = SetupRecord(name, float(seconds), float(flops), inside.index if inside is not None else None)
        self.setup.append(record)
        return record

    @property
    def setup_seconds(self) -> float:
        return sum(s.seconds for s in self.setup)

    @property
    def setup_flops(self) -> float:
        return sum(s.flops for s in self.setup)

    def _setup_inside(self) -> dict[int, float]:
        inside: dict[int, float] = {}
        for record in self.setup:
            if record.call_index is not None:
                inside[record.call_index] = inside.get(record.call_index, 0.0) + record.seconds
        return inside

    def _call_seconds(self, call: CallRecord, inside: dict[int, float]) -> float:
        """The call's model time without the setup work that ran inside it."""
        return max(call.seconds - inside.get(call.index, 0.0), 0.0)

    # --- aggregation --------------------------------------------------------------------------
    def steps(self) -> list[StepRecord]:
        inside = self._setup_inside()
        grouped: dict[object, list[CallRecord]] = {}
        for call in self.calls:
            grouped.setdefault(call.step if call.step is not None else ("call", call.index), []).append(call)
        records = []
        for calls in grouped.values():
            methods: dict[str, str] = {}
            for call in calls:
                for name, text in call.methods.items():
                    methods.setdefault(name, text)
            records.append(
                StepRecord(
                    step=calls[0].step,
                    sigma=calls[0].sigma,
                    calls=len(calls),
                    executed=sum(c.executed.total for c in calls),
                    full=sum(c.full.total for c in calls),
                    seconds=sum(self._call_seconds(c, inside) for c in calls),
                    methods=methods,
                    ran_model=any(c.ran_model for c in calls),
                )
            )
        return records

    @property
    def executed_flops(self) -> float:
        """FLOPs of the sampling steps (one-off setup work not included: see setup_flops)."""
        return sum(c.executed.total for c in self.calls)

    @property
    def full_flops(self) -> float:
        return sum(c.full.total for c in self.calls)

    @property
    def model_seconds(self) -> float:
        """Model time of the sampling steps (one-off setup work not included: see setup_seconds)."""
        inside = self._setup_inside()
        return sum(self._call_seconds(c, inside) for c in self.calls)

    @property
    def flops_reduction(self) -> float:
        """x-fold fewer FLOPs than the unpatched model (1.0 = none)."""
        return _ratio(self.full_flops, self.executed_flops)

    def comparable_to(self, other: "RunRecord") -> bool:
        return (
            other is not self
            and other.finished
            and other.latent_shape == self.latent_shape
            and other.total_steps == self.total_steps
            and len(other.steps()) == len(self.steps())
            and _same_sigmas(self, other)
        )

    # --- reports ------------------------------------------------------------------------------
    def progress(self, settled_steps: int | None = None, baseline: "RunRecord | None | str" = LATEST) -> dict:
        """Plain data for a live view: the steps so far (only the first `settled_steps` when given),
        the one-off setup, a summary of the run so far, and the full-compute baseline's steps.

        `baseline`: a run to compare with, None for none, or LATEST: the latest comparable
        full-compute run this process has seen (none for a full-compute run itself)."""
        if isinstance(baseline, str):  # LATEST
            baseline = None if self.full_compute else RECENT_FULL_COMPUTE.latest_comparable(self)
        steps = [s for s in self.steps() if s.step is not None and (settled_steps is None or s.step < settled_steps)]
        return {
            "run_id": self.run_id,
            "model": self.model,
            "plan": self.plan,
            "full_compute": self.full_compute,
            "total_steps": self.total_steps,
            "done": self.finished,
            "summary": self.summary(baseline, settled_steps=None if self.finished else len(steps)),
            "flops_reduction": _number(self.flops_reduction),
            "model_seconds": self.model_seconds,
            "steps": [_step_data(s) for s in steps],
            "setup": [{"name": s.name, "seconds": s.seconds, "flops": s.flops} for s in self.setup],
            "baseline": _baseline_data(baseline),
        }

    def summary(self, baseline: "RunRecord | None" = None, settled_steps: int | None = None) -> str:
        """One line: FLOPs and model time against full compute, the setup apart, what ran.

        `settled_steps`: a run in progress, compared over the steps it has finished so far."""
        steps = self.steps()
        if settled_steps is not None:
            steps = [s for s in steps if s.step is not None and s.step < settled_steps]
        executed, full = sum(s.executed for s in steps), sum(s.full for s in steps)
        seconds = sum(s.seconds for s in steps)
        text = _times(_ratio(full, executed), "fewer", "more") + " FLOPs"
        if self.full_compute:  # the baseline itself: there is nothing to be fewer than
            text = f"full compute, model time {seconds:.3f} s (a baseline for other runs)"
        elif baseline is not None and seconds > 0:
            base_seconds = sum(s.seconds for s in baseline.steps()[: len(steps)])
            text += ", " + _times(base_seconds / seconds, "faster", "slower") + " model time"
            text += f" ({seconds:.3f} s vs {base_seconds:.3f} s full compute)"
        else:
            text += f", model time {seconds:.3f} s (no full-compute run of this shape to compare)"
        if self.setup:
            names = ", ".join(dict.fromkeys(s.name for s in self.setup))
            text += f"; one-off setup {self.setup_seconds:.3f} s, {self.setup_flops / 1e9:.3g} GFLOP ({names})"
        done = f"{len(steps)} steps" if settled_steps is None else f"step {len(steps)}/{self.total_steps}"
        calls = len(self.calls) if settled_steps is None else sum(s.calls for s in steps)  # the running step's later
        return f"{text} - {done}, {calls} model calls, {self.plan}"

    def table(self, baseline: "RunRecord | None" = None) -> str:
        """The per-step table, plain text: a row of numbers per sampling step (and per setup work), narrow enough for a
        node's text preview (58 characters with a baseline), and below a row what the methods did, when they did
        anything."""
        base_steps = baseline.steps() if baseline is not None else None
        header = f"{'step':>5} {'sigma':>7} {'calls':>5} {'GFLOP':>7} {'FLOPs':>6} {'ms':>7}"
        if base_steps is not None:
            header += f" {'ms full':>7} {'speedup':>7}"
        lines = [header]
        indent = " " * 6
        for record in self.setup:
            where = f" (inside model call {record.call_index})" if record.call_index is not None else ""
            lines.append(f"{'setup':>5} {'':>7} {'':>5} {_fit(record.flops / 1e9, 3)} {'':>6} {_fit(record.seconds * 1e3, 2)}")
            lines.append(f"{indent}{record.name}, once{where}; not in any step")
        for i, step in enumerate(self.steps()):
            label = "-" if step.step is None else str(step.step)
            row = (f"{label:>5} {step.sigma:>7.4f} {step.calls:>5} {_fit(step.executed / 1e9, 3)} {step.flops_ratio:>6.1%}"
                   f" {_fit(step.seconds * 1e3, 2)}")
            if base_steps is not None:
                row += f" {_fit(base_steps[i].seconds * 1e3, 2)} {_ratio(base_steps[i].seconds, step.seconds):>6.2f}x"
            lines.append(row)
            if not step.ran_model:
                lines.append(f"{indent}model not run (answered by another node, e.g. a cache)")
            elif step.methods:
                lines.append(indent + "; ".join(f"{k}: {v}" for k, v in step.methods.items()))
        total = (f"{'all':>5} {'':>7} {len(self.calls):>5} {_fit(self.executed_flops / 1e9, 3)}"
                 f" {_ratio(self.executed_flops, self.full_flops):>6.1%} {_fit(self.model_seconds * 1e3, 2)}")
        if baseline is not None:
            total += f" {_fit(baseline.model_seconds * 1e3, 2)} {_ratio(baseline.model_seconds, self.model_seconds):>6.2f}x"
        lines.append(total)
        lines.append(f"{indent}FLOPs: of the full model's {self.full_flops / 1e9:.3f} GFLOP"
                     + ("; steps only, setup above" if self.setup else ""))
        return "\n".join(lines)

    def block_table(self) -> str:
        """Per-block details (tokens kept, width kept, ...) of every call that has any."""
        lines = []
        for call in self.calls:
            if not call.blocks:
                continue
            details = ", ".join(
                f"{label} " + " ".join(f"{k}={v:g}" for k, v in metrics.items()) for label, metrics in call.blocks.items()
            )
            lines.append(f"step {call.step} call {call.index}: {details}")
        return "\n".join(lines)


def _fit(value: float, decimals: int, width: int = 7) -> str:
    """`value` right-aligned in `width` characters, with fewer decimals as it grows (a 12B model's step is 60000 GFLOP)."""
    for places in range(decimals, -1, -1):
        text = f"{value:>{width}.{places}f}"
        if len(text) <= width:
            return text
    return text


def _times(factor: float, more: str, less: str) -> str:
    """'x2.04 faster' for a factor of 2.04, 'x2.04 slower' for 0.49: the factor always >= 1."""
    if not math.isfinite(factor) or factor <= 0:
        return f"x{factor:.2f} {more}"
    return f"x{factor:.2f} {more}" if factor >= 0.995 else f"x{1 / factor:.2f} {less}"


def _number(value: float) -> float | None:
    """A number a browser can parse: JSON has no NaN or infinity (a sigma is NaN until the step tracker
    has read it, e.g. on an accelerator until the run ends)."""
    return value if math.isfinite(value) else None


def _step_data(step: StepRecord) -> dict:
    return {
        "step": step.step, "sigma": _number(step.sigma), "calls": step.calls, "ms": step.seconds * 1e3,
        "flops_ratio": _number(step.flops_ratio),
    }


def _baseline_data(baseline: "RunRecord | None") -> dict | None:
    if baseline is None:
        return None
    steps = [s for s in baseline.steps() if s.step is not None]
    return {"run_id": baseline.run_id, "model_seconds": baseline.model_seconds, "steps": [_step_data(s) for s in steps]}


class TelemetrySink:
    """The runs of one patched model, newest last; shared (not copied) by every clone of the model."""

    def __init__(self, keep: int = 32):
        self._runs: deque[RunRecord] = deque(maxlen=keep)
        self._lock = threading.Lock()

    def add(self, run: RunRecord) -> None:
        with self._lock:
            self._runs.append(run)

    def runs(self) -> list[RunRecord]:
        with self._lock:
            return list(self._runs)

    def latest(self) -> RunRecord | None:
        runs = self.runs()
        return runs[-1] if runs else None

    def latest_comparable(self, run: RunRecord) -> RunRecord | None:
        """The newest run of the same shape, e.g. a full-compute run to measure a speedup against."""
        for candidate in reversed(self.runs()):
            if run.comparable_to(candidate):
                return candidate
        return None

    def __deepcopy__(self, memo: dict) -> "TelemetrySink":
        return self


def find_baseline(run: RunRecord, sinks: Iterable[TelemetrySink]) -> RunRecord | None:
    for sink in sinks:
        found = sink.latest_comparable(run)
        if found is not None:
            return found
    return None


class RecentFullCompute(TelemetrySink):
    """The latest finished full-compute runs (every method off) of every model this process sampled:
    what a live view compares a run with when no baseline is connected to it."""

    def latest_comparable(self, run: RunRecord) -> RunRecord | None:
        for candidate in reversed(self.runs()):
            if candidate.model != run.model or candidate.device != run.device:
                continue
            if run.comparable_to(candidate) or (not run.finished and _same_schedule(run, candidate)):
                return candidate
        return None


def _same_schedule(run: RunRecord, candidate: RunRecord) -> bool:
    """A run in progress (its steps still coming) against a finished one: same latent and step count."""
    return (
        candidate is not run and candidate.finished
        and candidate.latent_shape == run.latent_shape and candidate.total_steps == run.total_steps
        and _same_sigmas(run, candidate)
    )


def _same_sigmas(run: RunRecord, other: RunRecord) -> bool:
    """Whether two runs sample the same schedule (runs recorded without one compare by shape only)."""
    return not run.schedule or not other.schedule or run.schedule == other.schedule


RECENT_FULL_COMPUTE = RecentFullCompute(keep=8)
