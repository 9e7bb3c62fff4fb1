"""Plain PyTorch in place of the host's fused kernels that autograd cannot go through, while the student trains.

ComfyUI 0.12.1 with comfy-kitchen binds its RoPE kernels (custom ops registered without a backward formula) as
module globals of its model code: `comfy.ldm.flux.math.apply_rope`, `comfy.ldm.wan.model.apply_rope1`, and so on.
Which kernels need a stand-in is found by what the host has, never by its version: each global of the model's
code modules that has a stand-in here is probed with a tiny backward, and only the ones that fail it are replaced,
for the student's forward (and a checkpointed block's rerun in backward) only, and put back afterwards. Sampling,
and every other host whose kernels have a backward, runs the host's own kernels untouched.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator

import torch


def rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of one tensor: each pair of features (x0, x1) times its 2x2 rotation in `freqs_cis`
    (..., pairs, 2, 2), computed in `freqs_cis`' dtype, with the same operations (multiply, then add the product)."""
    pairs = x.to(dtype=freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    rotated = torch.addcmul(freqs_cis[..., 0] * pairs[..., 0], freqs_cis[..., 1], pairs[..., 1])
    return rotated.reshape(*x.shape).type_as(x)


def rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of queries and keys."""
    return rope1(xq, freqs_cis), rope1(xk, freqs_cis)


# the host's names for kernels that have a plain stand-in, and a tiny call of each to probe its backward with
STAND_INS: dict[str, Callable] = {"apply_rope1": rope1, "apply_rope": rope}


def _probe_call(name: str, kernel: Callable, x: torch.Tensor) -> torch.Tensor:
    freqs = torch.randn(1, 1, 2, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = kernel(x, x * 2, freqs) if name == "apply_rope" else kernel(x, freqs)
    return sum(t.sum() for t in out) if isinstance(out, tuple) else out.sum()


def has_backward(name: str, kernel: Callable) -> bool:
    """Whether autograd goes through `kernel` (one of STAND_INS' names). A kernel that fails on the probe's small
    CPU tensors in forward is left alone: the probe cannot tell, and the host's kernel is then the safer choice."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(1, 1, 2, 4, requires_grad=True)
        try:
            total = _probe_call(name, kernel, x)
        except Exception:  # noqa: BLE001 (any failure of a foreign kernel: not ours to judge)
            return True
        try:
            torch.autograd.grad(total, x)
        except RuntimeError:
            return False
    return True


def code_modules(diffusion_model: torch.nn.Module) -> list[ModuleType]:
    """The modules the model's layers are defined in, and the host modules of the functions those call (Flux's
    blocks call `attention` from flux.math, whose globals hold the RoPE kernel)."""
    modules: dict[str, ModuleType] = {}
    for layer in diffusion_model.modules():
        name = type(layer).__module__
        if name in sys.modules:
            modules.setdefault(name, sys.modules[name])
    for module in list(modules.values()):
        package = module.__name__.split(".")[0]
        for value in vars(module).values():
            owner = getattr(value, "__module__", None) if inspect.isfunction(value) else None
            if owner and owner.split(".")[0] == package and owner in sys.modules:
                modules.setdefault(owner, sys.modules[owner])
    return list(modules.values())


@dataclass(frozen=True)
class KernelSwap:
    module: ModuleType
    name: str
    stand_in: Callable

    def __str__(self) -> str:
        return f"{self.module.__name__}.{self.name}"


def kernels_without_backward(diffusion_model: torch.nn.Module) -> list[KernelSwap]:
    """The host kernels the model's code calls that autograd cannot go through and that have a stand-in."""
    swaps = []
    for module in code_modules(diffusion_model):
        for name, stand_in in STAND_INS.items():
            kernel = getattr(module, name, None)
            if callable(kernel) and kernel is not stand_in and not has_backward(name, kernel):
                swaps.append(KernelSwap(module, name, stand_in))
    return swaps


def differentiable_host(diffusion_model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """A context (entered around each student forward) in which the model's code calls stand-ins for the
    kernels without backward; probed once, here. Nests: an inner context puts back what the outer one set."""
    swaps = kernels_without_backward(diffusion_model)

    @contextlib.contextmanager
    def swapped() -> Iterator[None]:
        previous = [(swap, getattr(swap.module, swap.name)) for swap in swaps]
        for swap in swaps:
            setattr(swap.module, swap.name, swap.stand_in)
        try:
            yield
        finally:
            for swap, kernel in previous:
                setattr(swap.module, swap.name, kernel)

    swapped.swaps = swaps  # what was found, for the log and the tests
    return swapped


__all__ = ["KernelSwap", "STAND_INS", "code_modules", "differentiable_host", "has_backward", "kernels_without_backward",
           "rope", "rope1"]
