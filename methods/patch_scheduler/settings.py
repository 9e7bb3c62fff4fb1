"""The Dynamic Patch Scheduler's settings: the mode, auto mode's measures, the manual schedule, the trained file."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ...families import UnsupportedModelError
from ...core.plan import MethodSettings
from .file import PatchEmbeddingFile
from .schedule import FACTORS, ScheduleRange

if TYPE_CHECKING:
    from ...families import ModelAdapter

MODES = ("auto", "manual")
FIRST_NATIVE_STEPS = 3


# --- settings ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchSchedulerSettings(MethodSettings):
    method: ClassVar[str] = "patch_scheduler"

    mode: str = "auto"
    # Defaults measured in BENCHMARKS.md ("Patch Scheduler auto"): coarse steps on every model and sampler
    # tried (x1.16-1.18 fewer FLOPs), 27-28 dB on the reference model; 4x patches cost ~3 dB for x1.2.
    tau: float = 5.0  # relative: the Δ³ statistic over its value at the first step evaluated
    epsilon: float = 0.4  # the percentile over patches, as a fraction
    max_factor: int = 2
    last_native_steps: int = 2
    schedule: tuple[ScheduleRange, ...] = ()  # manual mode
    embedding: PatchEmbeddingFile | None = None
    start_percent: float = 0.0  # sigma-based, as ComfyUI's start/end percent
    end_percent: float = 1.0
    first_native_steps: int = FIRST_NATIVE_STEPS

    def candidate_factors(self) -> tuple[int, ...]:
        """Coarse factors auto mode may choose."""
        available = self.embedding.factors if self.embedding is not None else FACTORS
        return tuple(f for f in available if f <= self.max_factor)

    @property
    def enabled(self) -> bool:
        if self.start_percent >= self.end_percent:
            return False
        if self.mode == "manual":
            return any(r.factor > 1 for r in self.schedule)
        return self.tau > 0 and bool(self.candidate_factors())

    def validate(self, adapter: "ModelAdapter") -> None:
        if self.mode not in MODES:
            raise ValueError(f"Patch scheduler mode must be one of {', '.join(MODES)}, not {self.mode!r}.")
        if not (math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"Patch scheduler tau must be a finite number >= 0, not {self.tau}.")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"Patch scheduler percentile must be between 0 and 1, not {self.epsilon}.")
        if self.max_factor not in (1, *FACTORS):
            raise ValueError(f"Patch scheduler max patch factor must be 1, 2 or 4, not {self.max_factor}.")
        if self.last_native_steps < 0 or self.first_native_steps < 0:
            raise ValueError("Patch scheduler: the number of native steps at the start and end cannot be negative.")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(
                f"Patch scheduler start/end percent must satisfy 0 <= start <= end <= 1, got {self.start_percent}, {self.end_percent}."
            )
        if self.mode == "manual" and not self.schedule:
            raise ValueError("Patch scheduler: manual mode needs a schedule such as '0-40%:4, 40-70%:2, 70-100%:1'.")
        grid = adapter.coarse_grid()
        if grid is None:
            raise UnsupportedModelError(f"The patch scheduler does not support {adapter.display_name} models yet.")
        if self.embedding is None:
            return
        if not grid.trained_embedding:
            raise UnsupportedModelError(
                f"The patch scheduler runs {adapter.display_name} models training-free only; choose no embedding file."
            )
        self.embedding.check_model(grid, adapter.display_name)
        self.embedding.check_blocks(adapter)
        factors = self.embedding.factors
        if self.mode == "manual":
            missing = sorted({r.factor for r in self.schedule if r.factor > 1} - set(factors))
            if missing:
                raise ValueError(
                    f"The manual patch schedule asks for {', '.join(f'{f}x' for f in missing)} patches, but the embedding "
                    f"'{self.embedding.name}' holds only {', '.join(f'{f}x' for f in factors)}."
                )
        elif not self.candidate_factors():
            raise ValueError(
                f"The embedding '{self.embedding.name}' holds {', '.join(f'{f}x' for f in factors)} patches, all above the "
                f"max patch factor {self.max_factor}."
            )

    def describe(self) -> str:
        if self.mode == "manual":
            text = f"patch scheduler (manual {', '.join(r.describe() for r in self.schedule)})"
        else:
            text = (f"patch scheduler (auto, τ {self.tau:g}, p{self.epsilon * 100:g}, up to "
                    f"{max(self.candidate_factors(), default=1)}x, last {self.last_native_steps} native)")
        if self.embedding is not None:
            text += f" with {self.embedding.name}"
        return text
