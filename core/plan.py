"""The plan a patched model carries: which dynamic methods are on, with which settings.

Nodes only contribute settings to a plan; the executor reads it at sampling time. A plan is
immutable, so ComfyUI's deepcopy of `model_options` at every `ModelPatcher.clone()` can share it
(and its router/LoRA tensors) instead of copying them.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar, Mapping

from .telemetry import TelemetrySink

if TYPE_CHECKING:
    from ..families import ModelAdapter


@dataclass(frozen=True)
class MethodSettings:
    """Settings of one dynamic method, as a node sets them. Subclasses are frozen dataclasses."""

    method: ClassVar[str]  # unique name; the same node applied twice replaces its own settings

    def validate(self, adapter: "ModelAdapter") -> None:
        """Raise ValueError with a message a person can act on if these settings cannot apply."""

    @property
    def enabled(self) -> bool:
        """False when the settings ask for full compute everywhere (the method is then skipped)."""
        return True

    def describe(self) -> str:
        return self.method


class DynamicPlan:
    """Method name -> settings, plus the telemetry sink of the model that carries the plan."""

    __slots__ = ("_settings", "telemetry")

    def __init__(self, settings: Mapping[str, MethodSettings] | None = None, telemetry: TelemetrySink | None = None):
        self._settings = MappingProxyType(dict(settings or {}))
        self.telemetry = telemetry if telemetry is not None else TelemetrySink()

    @property
    def settings(self) -> Mapping[str, MethodSettings]:
        return self._settings

    def with_settings(self, settings: MethodSettings) -> "DynamicPlan":
        """A new plan (with its own telemetry) where `settings` replaces any earlier settings of its method."""
        return DynamicPlan({**self._settings, settings.method: settings})

    def enabled_settings(self) -> list[MethodSettings]:
        return [s for s in self._settings.values() if s.enabled]

    def describe(self) -> str:
        active = [s.describe() for s in self.enabled_settings()]
        return ", ".join(active) if active else "every method off"

    def __deepcopy__(self, memo: dict) -> "DynamicPlan":
        return self

    def __copy__(self) -> "DynamicPlan":
        return self

    def __repr__(self) -> str:
        return f"DynamicPlan({self.describe()})"
