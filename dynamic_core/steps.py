"""Which sampling step a model call belongs to.

ComfyUI's samplers report progress through a per-step callback that fires right after the *first*
model evaluation of step i. Samplers that evaluate more than once per step (Heun, DPM++ 2S, DPM2)
make their extra evaluations after that callback, and Heun's extra evaluation sits exactly at the
next step's sigma, so at call time it cannot be told apart from the next step's first evaluation.

So attribution happens in two stages:
- at call time a provisional step from sigma (never moving backwards, never behind the last
  callback): what methods see, and always the step whose sigma the call evaluates;
- at each callback i, exact attribution in hindsight: the last evaluation before it (the trailing
  calls at one sigma, one per cond/uncond chunk) is step i's first, every call between it and the
  previous callback belongs to step i-1. Calls after the last callback belong to the last step.
A sampler that never calls back keeps the provisional, sigma-based attribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Protocol, Sequence

_REL_TOL = 1e-4


class StepLabelled(Protocol):
    step: int | None


@dataclass(frozen=True)
class StepInfo:
    step: int | None  # provisional 0-based index into this run's schedule; None without a schedule
    call_in_step: int  # calls already attributed to that step before this one
    total_steps: int
    sigma: float
    percent: float  # fraction of the model's whole noise range done at this sigma (0 = pure noise)

    @property
    def progress(self) -> float:
        """Fraction of this run's steps done (KSamplerAdvanced start/end steps count as a whole run)."""
        if self.step is None or self.total_steps <= 0:
            return 0.0
        return self.step / self.total_steps


@dataclass
class _Pending:
    sigma: float
    chunk_key: Hashable
    record: StepLabelled


class StepTracker:
    def __init__(self, sigmas: Sequence[float], sigma_to_percent: Callable[[float], float] | None = None):
        self.sigmas = [float(s) for s in sigmas]
        self.total_steps = max(len(self.sigmas) - 1, 0)
        self._sigma_to_percent = sigma_to_percent
        self._step = 0
        self._counts: dict[int, int] = {}
        self._pending: list[_Pending] = []  # calls since the last callback
        self._last_callback: int | None = None
        self._percent_cache: dict[float, float] = {}

    # --- call time ----------------------------------------------------------------------------
    def _at_or_below(self, sigma: float, step: int) -> bool:
        reference = self.sigmas[step]
        return sigma <= reference + _REL_TOL * max(abs(reference), 1e-8)

    def locate(self, sigma: float, chunk_key: Hashable, record: StepLabelled) -> StepInfo:
        """Provisional StepInfo for a model call at `sigma`; `record.step` is corrected later."""
        if self.total_steps == 0 or math.isnan(sigma):
            record.step = None
            return StepInfo(None, 0, self.total_steps, sigma, self._percent(sigma))
        step = self._step
        while step < self.total_steps - 1 and self._at_or_below(sigma, step + 1):
            step += 1
        self._step = step
        record.step = step
        self._pending.append(_Pending(sigma, chunk_key, record))
        count = self._counts.get(step, 0)
        self._counts[step] = count + 1
        return StepInfo(step, count, self.total_steps, sigma, self._percent(sigma))

    # --- callbacks ----------------------------------------------------------------------------
    def step_callback(self, step: int) -> None:
        """The sampler reported step `step` (its first evaluation is done)."""
        first_eval = {id(p) for p in self._trailing_evaluation()}
        for pending in self._pending:
            pending.record.step = step if id(pending) in first_eval else max(step - 1, 0)
        self._pending = []
        self._last_callback = step
        self._step = max(self._step, min(step, max(self.total_steps - 1, 0)))

    def finish(self) -> None:
        """Calls after the last callback were extra evaluations of the last reported step."""
        if self._last_callback is not None:
            for pending in self._pending:
                pending.record.step = self._last_callback
        self._pending = []

    def _trailing_evaluation(self) -> list[_Pending]:
        """The calls of the most recent evaluation: the trailing calls at one sigma, one per chunk key."""
        group: list[_Pending] = []
        keys: set = set()
        for pending in reversed(self._pending):
            if group and (pending.chunk_key in keys or not math.isclose(pending.sigma, group[0].sigma, rel_tol=_REL_TOL)):
                break
            group.append(pending)
            keys.add(pending.chunk_key)
        return group

    def _percent(self, sigma: float) -> float:
        if self._sigma_to_percent is None or math.isnan(sigma):
            return 0.0
        if sigma not in self._percent_cache:
            self._percent_cache[sigma] = self._sigma_to_percent(sigma)
        return self._percent_cache[sigma]


def invert_decreasing(fn: Callable[[float], float], value: float, iterations: int = 40) -> float:
    """x in [0, 1] with fn(x) == value for a decreasing fn (e.g. ComfyUI's percent_to_sigma)."""
    lo, hi = 0.0, 1.0
    if value >= float(fn(lo)):
        return lo
    if value <= float(fn(hi)):
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(fn(mid)) > value:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
