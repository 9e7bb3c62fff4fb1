"""The ATen operations a computation runs, in order, with their input shapes: two runs that take the same
kernels show the same trace on any CPU, whereas comparing their bits only shows a difference on a CPU whose
kernels happen to round differently."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Trace(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def traced(run: Callable[[], Any]) -> tuple[Any, list[tuple[str, tuple]]]:
    """`run()`'s result and the operations it ran (name and input shapes)."""
    with _Trace() as trace:
        result = run()
    return result, trace.ops


def first_difference(a: list, b: list) -> str:
    """Where two traces part, for an assertion message."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"operation {index}: {x} != {y}"
    return f"lengths {len(a)} != {len(b)}"


def tracing_model_calls(model: Any) -> tuple[Any, list[tuple[str, tuple]]]:
    """A clone of `model` (a ModelPatcher) whose model calls are traced into the returned list; loading, patching
    and unpatching weights are not: only the computation is compared."""
    ops: list[tuple[str, tuple]] = []

    def model_call(apply, args):
        out, call_ops = traced(lambda: apply(args["input"], args["timestep"], **args["c"]))
        ops.extend(call_ops)
        return out

    clone = model.clone()
    clone.set_model_unet_function_wrapper(model_call)
    return clone, ops
