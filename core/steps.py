"""Which sampling step a model call belongs to.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence

_REL_TOL = 1e-4
# Devices whose tensors can be read at call time without stalling the host (a benchmark that stands in
# for an accelerator on the CPU empties it, to run the code path an accelerator takes).
FREE_READ_DEVICES: tuple[str, ...] = ("cpu",)


class StepLabelled(Protocol):
    step: int | None


@dataclass(frozen=True)
class StepInfo:
    step: int | None  # provisional 0-based index into this run's schedule; None without a schedule
    call_in_step: int  # calls already attributed to that step before this one
    total_steps: int
    sigma: float  # the call's sigma, or the schedule's sigma of `step` while the call's is not read yet
    percent: float  # fraction of the model's whole noise range done at this sigma (0 = pure noise)

    @property
    def progress(self) -> float:
        """Fraction of this run's steps done (KSamplerAdvanced start/end steps count as a whole run)."""
        if self.step is None or self.total_steps <= 0:
            return 0.0
        return self.step / self.total_steps


@dataclass
class _Pending:
    sigma: float | None  # None: not read yet (a device tensor in `tensor`)
    chunk_key: Hashable
    record: StepLabelled
    tensor: Any = None


def _read_all(pendings: Sequence[_Pending]) -> None:
    """Read the sigmas still on the device, all in one transfer."""
    unread = [p for p in pendings if p.sigma is None]
    if not unread:
        return
    import torch

    values = torch.stack([p.tensor.detach().reshape(-1).max().float() for p in unread]).cpu().tolist()
    for pending, value in zip(unread, values):
        pending.sigma = value
        if hasattr(pending.record, "sigma"):
            pending.record.sigma = value


class StepTracker:
    """Attributes model calls to sampling steps.

    `read_device_sigmas`: whether a sigma that lives on an accelerator may be read at call time.
    Reading it waits for the device (a host sync per call), so after the sampler's first callback
    the step comes from the callbacks instead (the call after callback i evaluates step i + 1's
    sigma or, for midpoint samplers, a sigma between), and the exact attribution is made once, at
    the end of the run, from all sigmas read in one transfer. Before the first callback, and for
    samplers that never call back, the sigma is read.
    """

    def __init__(self, sigmas: Sequence[float], sigma_to_percent: Callable[[float], float] | None = None,
                 read_device_sigmas: bool = False, free_read_devices: tuple[str, ...] | None = None):
        self.sigmas = [float(s) for s in sigmas]
        self.total_steps = max(len(self.sigmas) - 1, 0)
        self._sigma_to_percent = sigma_to_percent
        self._read_device_sigmas = read_device_sigmas
        # where reading a sigma costs no host sync
        self._free_read_devices = FREE_READ_DEVICES if free_read_devices is None else free_read_devices
        self._step = 0
        self._counts: dict[int, int] = {}
        self._pending: list[_Pending] = []  # calls since the last callback
        self._deferred: list[tuple[list[_Pending], int]] = []  # callbacks whose attribution waits for sigmas
        self._last_callback: int | None = None
        self._percent_cache: dict[float, float] = {}
        self.sigma_reads = 0  # sigmas read at call time from a device (host syncs)
        # The schedule's percents now, at the run's start: an EPS model's percent_to_sigma looks its discrete sigma
        # table up with a host-built tensor and a read, ~40 times per sigma inverted (PixArt-Σ)
        for sigma in self.sigmas:
            self._percent(sigma)

    # --- call time ----------------------------------------------------------------------------
    def _at_or_below(self, sigma: float, step: int) -> bool:
        reference = self.sigmas[step]
        return sigma <= reference + _REL_TOL * max(abs(reference), 1e-8)

    def locate(self, sigma: Any, chunk_key: Hashable, record: StepLabelled) -> StepInfo:
        """Provisional StepInfo for a model call at `sigma` (a float, or a tensor of the call's sigmas);
        `record.step` is corrected later."""
        known: float | None
        tensor = None
        if isinstance(sigma, (int, float)):
            known = float(sigma)
        elif (free := sigma.device.type in self._free_read_devices) or self._read_device_sigmas or self._last_callback is None:
            self.sigma_reads += 0 if free else 1
            known = float(sigma.detach().reshape(-1).max())
        else:
            known, tensor = None, sigma
        if hasattr(record, "sigma"):
            record.sigma = known if known is not None else math.nan
        if self.total_steps == 0 or (known is not None and math.isnan(known)):
            record.step = None
            value = known if known is not None else math.nan
            return StepInfo(None, 0, self.total_steps, value, self._percent(value))
        step = self._step
        if known is not None:
            while step < self.total_steps - 1 and self._at_or_below(known, step + 1):
                step += 1
        else:  # after callback i the next evaluations belong to step i + 1 (see the class docstring)
            step = max(step, min(self._last_callback + 1, self.total_steps - 1))
        self._step = step
        record.step = step
        self._pending.append(_Pending(known, chunk_key, record, tensor))
        count = self._counts.get(step, 0)
        self._counts[step] = count + 1
        value = known if known is not None else self.sigmas[step]
        return StepInfo(step, count, self.total_steps, value, self._percent(value))

    # --- callbacks ----------------------------------------------------------------------------
    def step_callback(self, step: int) -> None:
        """The sampler reported step `step` (its first evaluation is done)."""
        if any(p.sigma is None for p in self._pending):
            self._deferred.append((self._pending, step))  # attributed at the end, when the sigmas are read
        else:
            self._attribute(self._pending, step)
        self._pending = []
        self._last_callback = step
        self._step = max(self._step, min(step, max(self.total_steps - 1, 0)))

    def finish(self) -> None:
        """Exact attribution of every call whose sigma was not read yet; calls after the last callback
        were extra evaluations of the last reported step."""
        _read_all([p for pendings, _ in self._deferred for p in pendings] + self._pending)
        for pendings, step in self._deferred:
            self._attribute(pendings, step)
        self._deferred = []
        if self._last_callback is not None:
            for pending in self._pending:
                pending.record.step = self._last_callback
        self._pending = []

    @staticmethod
    def _attribute(pendings: list[_Pending], step: int) -> None:
        first_eval = {id(p) for p in _trailing_evaluation(pendings)}
        for pending in pendings:
            pending.record.step = step if id(pending) in first_eval else max(step - 1, 0)

    def percent_of(self, sigma: float) -> float:
        """Fraction of the model's noise range done at `sigma` (0 = pure noise)."""
        return self._percent(sigma)

    def _percent(self, sigma: float) -> float:
        if self._sigma_to_percent is None or math.isnan(sigma):
            return 0.0
        if sigma not in self._percent_cache:
            self._percent_cache[sigma] = self._sigma_to_percent(sigma)
        return self._percent_cache[sigma]


def _trailing_evaluation(pendings: list[_Pending]) -> list[_Pending]:
    """The calls of the most recent evaluation: the trailing calls at one sigma, one per chunk key."""
    group: list[_Pending] = []
    keys: set = set()
    for pending in reversed(pendings):
        if group and (pending.chunk_key in keys or not math.isclose(pending.sigma, group[0].sigma, rel_tol=_REL_TOL)):
            break
        group.append(pending)
        keys.add(pending.chunk_key)
    return group


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
