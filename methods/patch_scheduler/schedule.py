"""Manual patch schedules of the Dynamic Patch Scheduler: `0-40%:4, 40-70%:2, 70-100%:1`.

Ranges are over the fraction of the run's steps done (step s of N at s/N); steps no range covers run
at the native patch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

FACTORS = (2, 4)  # coarse patch factors (DDiT: 2p and 4p), in a schedule and in a trained file


@dataclass(frozen=True)
class ScheduleRange:
    start: float  # percent of the run's steps, inclusive
    end: float  # percent, exclusive
    factor: int

    def describe(self) -> str:
        return f"{self.start:g}-{self.end:g}%:{self.factor}x"


_RANGE = re.compile(r"^(?P<start>\d+(?:\.\d*)?)\s*%?\s*-\s*(?P<end>\d+(?:\.\d*)?)\s*%?\s*:\s*(?P<factor>\d+)\s*x?$", re.IGNORECASE)


def parse_schedule(text: str) -> tuple[ScheduleRange, ...]:
    """Parse a manual schedule such as `0-40%:4, 40-70%:2, 70-100%:1` (items split by , ; or newlines)."""
    items = [item.strip() for item in re.split(r"[,;\n]", text or "") if item.strip()]
    if not items:
        raise ValueError("The manual patch schedule is empty; write ranges such as '0-40%:4, 40-70%:2, 70-100%:1'.")
    ranges = []
    for item in items:
        match = _RANGE.match(item)
        if match is None:
            raise ValueError(
                f"Cannot read '{item}' in the manual patch schedule; each range is start-end%:factor, e.g. '0-40%:4'."
            )
        start, end, factor = float(match["start"]), float(match["end"]), int(match["factor"])
        if not 0 <= start < end <= 100:
            raise ValueError(f"'{item}' in the manual patch schedule: ranges go from 0 to 100% and start before they end.")
        if factor not in (1, *FACTORS):
            raise ValueError(f"'{item}' in the manual patch schedule: the patch factor must be 1 (native), 2 or 4, not {factor}.")
        ranges.append(ScheduleRange(start, end, factor))
    ranges.sort(key=lambda r: r.start)
    for before, after in zip(ranges, ranges[1:]):
        if after.start < before.end:
            raise ValueError(f"The manual patch schedule has overlapping ranges: {before.describe()} and {after.describe()}.")
    return tuple(ranges)


def schedule_range_at(schedule: Sequence[ScheduleRange], percent: float) -> ScheduleRange | None:
    """The range covering `percent` (0-100) of the run's steps, or None."""
    return next((r for r in schedule if r.start <= percent < r.end), None)


def range_of_step(schedule: Sequence[ScheduleRange], step: int, steps: int) -> ScheduleRange | None:
    """The range manual mode uses for step `step` of a run of `steps`: the one covering 100 * step / steps
    (the scheduler at sampling time and the trainer choosing its coarse steps both ask this)."""
    return schedule_range_at(schedule, 100.0 * step / max(steps, 1))


__all__ = ["ScheduleRange", "parse_schedule", "range_of_step", "schedule_range_at"]
