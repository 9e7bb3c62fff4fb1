"""Per-call and per-step records of what a sampling run computed, and how long it took.

Every model call gets a CallRecord: step, sigma, which batch chunks were cond/uncond, what each
method did (its settings, per-block details such as tokens or width kept), the FLOPs executed
(analytic, from what the blocks really received) next to the FLOPs the unpatched model would have
executed, and the wall time of the call. A RunRecord aggregates them per sampling step and
compares against a full-compute run of the same shape when one is available.
"""
from __future__ import annotations

import math
import threading
import time
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

    # --- aggregation --------------------------------------------------------------------------
    def steps(self) -> list[StepRecord]:
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
                    seconds=sum(c.seconds for c in calls),
                    methods=methods,
                    ran_model=any(c.ran_model for c in calls),
                )
            )
        return records

    @property
    def executed_flops(self) -> float:
        return sum(c.executed.total for c in self.calls)

    @property
    def full_flops(self) -> float:
        return sum(c.full.total for c in self.calls)

    @property
    def model_seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

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
        )

    # --- reports ------------------------------------------------------------------------------
    def progress(self, settled_steps: int | None = None) -> dict:
        """Plain data for a live view: the steps so far (only the first `settled_steps` when given)."""
        steps = [s for s in self.steps() if s.step is not None and (settled_steps is None or s.step < settled_steps)]
        return {
            "model": self.model,
            "plan": self.plan,
            "total_steps": self.total_steps,
            "done": self.finished,
            "summary": self.summary() if self.finished else None,
            "flops_reduction": self.flops_reduction,
            "model_seconds": self.model_seconds,
            "steps": [
                {"step": s.step, "sigma": s.sigma, "calls": s.calls, "ms": s.seconds * 1e3, "flops_ratio": s.flops_ratio}
                for s in steps
            ],
        }

    def summary(self, baseline: "RunRecord | None" = None) -> str:
        text = f"x{self.flops_reduction:.2f} fewer FLOPs"
        if baseline is not None and self.model_seconds > 0:
            text += f", x{baseline.model_seconds / self.model_seconds:.2f} faster model time"
            text += f" ({self.model_seconds:.3f} s vs {baseline.model_seconds:.3f} s full compute)"
        else:
            text += f", model time {self.model_seconds:.3f} s (no full-compute run of this shape to compare)"
        return f"{text} - {len(self.steps())} steps, {len(self.calls)} model calls, {self.plan}"

    def table(self, baseline: "RunRecord | None" = None) -> str:
        """The per-step table, plain text, one row per sampling step."""
        base_steps = baseline.steps() if baseline is not None else None
        header = f"{'step':>4} {'sigma':>8} {'calls':>5} {'GFLOP run':>10} {'GFLOP full':>10} {'FLOPs':>6} {'ms':>9}"
        if base_steps is not None:
            header += f" {'ms full':>9} {'speedup':>7}"
        header += "  methods"
        lines = [header]
        for i, step in enumerate(self.steps()):
            label = "-" if step.step is None else str(step.step)
            row = (
                f"{label:>4} {step.sigma:>8.4f} {step.calls:>5} {step.executed / 1e9:>10.3f} {step.full / 1e9:>10.3f}"
                f" {step.flops_ratio:>6.1%} {step.seconds * 1e3:>9.2f}"
            )
            if base_steps is not None:
                base_ms = base_steps[i].seconds * 1e3
                row += f" {base_ms:>9.2f} {_ratio(base_steps[i].seconds, step.seconds):>6.2f}x"
            if not step.ran_model:
                methods = "model not run (answered by another node, e.g. a cache)"
            else:
                methods = "; ".join(f"{k}: {v}" for k, v in step.methods.items()) or "full compute"
            lines.append(f"{row}  {methods}")
        total = (
            f"{'all':>4} {'':>8} {len(self.calls):>5} {self.executed_flops / 1e9:>10.3f} {self.full_flops / 1e9:>10.3f}"
            f" {_ratio(self.executed_flops, self.full_flops):>6.1%} {self.model_seconds * 1e3:>9.2f}"
        )
        if baseline is not None:
            total += f" {baseline.model_seconds * 1e3:>9.2f} {_ratio(baseline.model_seconds, self.model_seconds):>6.2f}x"
        lines.append(total)
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
