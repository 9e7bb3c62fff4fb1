"""The session's shared models and what their kernels depend on besides the weights' values.

A test (or the pack, or the host) that leaves a parameter trainable, cast or laid out anew changes which
kernels every later test runs on that model, and on some CPUs their bits: "bit-identical" would then depend on
test order (issue 22). The root conftest checks these models after every test.
"""
from __future__ import annotations

from typing import Any

_MODELS: list[tuple[Any, list]] = []


def kernel_state(model: Any) -> list:
    return [(name, p.requires_grad, p.dtype, p.device, tuple(p.shape), p.stride())
            for name, p in model.model.diffusion_model.named_parameters()]


def session_model(model: Any) -> Any:
    """Register a session-scoped model (a ModelPatcher) as built; returns it."""
    _MODELS.append((model, kernel_state(model)))
    return model


def assert_session_models_unchanged() -> None:
    for model, built in _MODELS:
        changed = [(was, now) for was, now in zip(built, kernel_state(model)) if was != now]
        assert not changed, ("this test left a shared session model changed, so later tests may compute other bits: "
                             f"{changed[:2]}")
