"""TD-LoRA's settings: the loaded file and its strength."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ...families import ModelAdapter
from ...core.plan import MethodSettings
from .binding import BoundLayers
from .experts import TDLoRA


STRENGTH_RANGE = (-10.0, 10.0)


# --- settings and runtime ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TDLoRASettings(MethodSettings):
    method: ClassVar[str] = "td_lora"
    lora: TDLoRA
    bound: BoundLayers
    strength: float = 1.0
    weight_patches: Mapping[Any, Any] = field(default_factory=dict)  # what the host merged into weights, to undo on replace

    def validate(self, adapter: ModelAdapter) -> None:
        low, high = STRENGTH_RANGE
        if not (math.isfinite(self.strength) and low <= self.strength <= high):
            raise ValueError(f"TD-LoRA strength must be between {low:g} and {high:g}, got {self.strength}.")
        unknown = [b.label for b in self.bound.blocks if b not in adapter.blocks]
        if unknown:
            raise ValueError(f"TD-LoRA {self.lora.source}: blocks {', '.join(unknown)} do not exist in this model.")

    @property
    def enabled(self) -> bool:
        return self.strength != 0.0

    def describe(self) -> str:
        return f"TD-LoRA {self.lora.describe()} x{self.strength:g}"
