"""Manual patch schedules of the Dynamic Patch Scheduler: `0-40%:4, 40-70%:2, 70-100%:1`, or by step: `steps 0-1:2`.

A percent range is over the fraction of the run's steps done (step s of N at s/N); a step range names steps by
number (0 first, both ends included), the same steps however long the run. Steps no range covers run native.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

FACTORS = (2, 4)  # coarse patch factors (DDiT: 2p and 4p), in a schedule and in a trained file


@dataclass(frozen=True)
class ScheduleRange:
    start: float  # percent of the run's steps, inclusive; or, by step, the first step
    end: float  # percent, exclusive; or, by step, the last step (included)
    factor: int
    by_step: bool = False

    def span(self) -> str:
        return f"steps {self.start:g}-{self.end:g}" if self.by_step else f"{self.start:g}-{self.end:g}%"

    def describe(self) -> str:
        return f"{self.span()}:{self.factor}x"

    def covers(self, step: int, steps: int) -> bool:
        """Whether step `step` of a run of `steps` falls in this range."""
        if self.by_step:
            return self.start <= step <= self.end
        return self.start <= 100.0 * step / max(steps, 1) < self.end


_RANGE = re.compile(r"^(?P<start>\d+(?:\.\d*)?)\s*%?\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*%?\s*:\s*(?P<factor>\d+)\s*x?$", re.IGNORECASE)
_STEPS = re.compile(r"^steps?\s+(?P<start>\d+)\s*(?:-\s*(?P<end>\d+))?\s*:\s*(?P<factor>\d+)\s*x?$", re.IGNORECASE)


def parse_schedule(text: str) -> tuple[ScheduleRange, ...]:
    """Parse a manual schedule such as `0-40%:4, 40-70%:2, 70-100%:1` (items split by , ; or newlines)."""
    items = [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]
    if not items:
        raise ValueError("The manual patch schedule is empty; write ranges such as '0-40%:4, 40-70%:2, 70-100%:1'.")
    ranges = [_parse_range(item) for item in items]
    if len({r.by_step for r in ranges}) > 1:
        raise ValueError("The manual patch schedule mixes percent ranges and step ranges; use one kind, e.g. "
                         "'0-40%:2, 40-70%:2' or 'steps 0-1:2, steps 2-3:2'.")
    ranges.sort(key=lambda r: r.start)
    for before, after in zip(ranges, ranges[1:]):
        if after.start < before.end or before.by_step and after.start == before.end:
            raise ValueError(f"The manual patch schedule has overlapping ranges: {before.describe()} and {after.describe()}.")
    return tuple(ranges)


def _parse_range(item: str) -> ScheduleRange:
    by_step = _STEPS.match(item)
    if by_step is not None:
        start = int(by_step["start"])
        end = int(by_step["end"]) if by_step["end"] is not None else start
        if end < start:
            raise ValueError(f"'{item}' in the manual patch schedule: a step range starts before it ends.")
        return ScheduleRange(float(start), float(end), _factor(item, int(by_step["factor"])), by_step=True)
    match = _RANGE.match(item)
    if match is None:
        raise ValueError(
            f"Cannot read '{item}' in the manual patch schedule; each range is start-end%:factor, e.g. '0-40%:4', "
            "or steps first-last:factor, e.g. 'steps 0-1:2'."
        )
    start, end = float(match["start"]), float(match["end"])
    if not 0 <= start < end <= 100:
        raise ValueError(f"'{item}' in the manual patch schedule: ranges go from 0 to 100% and start before they end.")
    return ScheduleRange(start, end, _factor(item, int(match["factor"])))


def _factor(item: str, factor: int) -> int:
    if factor not in (1, *FACTORS):
        raise ValueError(f"'{item}' in the manual patch schedule: the patch factor must be 1 (native), 2 or 4, not {factor}.")
    return factor


def range_of_step(schedule: Sequence[ScheduleRange], step: int, steps: int) -> ScheduleRange | None:
    """The range manual mode uses for step `step` of a run of `steps` (the scheduler at sampling time and the trainer
    choosing its coarse steps both ask this)."""
    return next((r for r in schedule if r.covers(step, steps)), None)


__all__ = ["FACTORS", "ScheduleRange", "parse_schedule", "range_of_step"]
