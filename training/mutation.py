"""Autograd through blocks that write into their inputs (ComfyUI's Flux blocks do `img += ...`).

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

MUTATION_MODES = ("allow", "clone")


class _Saved:
    """One tensor autograd saved: the original until something writes into its storage, then a copy."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _CopyBeforeWrite(TorchDispatchMode):
    """Before an op writes into a tensor, copy every still-original saved tensor sharing its storage."""

    def __init__(self, saved: "SavedTensorCopies"):
        super().__init__()
        self.saved = saved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for index, argument in enumerate(func._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = kwargs.get(argument.name) if argument.kwarg_only or index >= len(args) else args[index]
            for tensor in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(tensor, torch.Tensor):
                    self.saved.before_write(tensor)
        return func(*args, **kwargs)


class SavedTensorCopies:
    """Saved-tensor hooks and a dispatch mode that copy a saved tensor only when it is about to change."""

    def __init__(self) -> None:
        # storage key -> records of the saved originals in that storage (weak: a record dies with its graph)
        self._by_storage: dict[tuple[int, torch.device], weakref.WeakSet] = {}

    @staticmethod
    def _key(tensor: torch.Tensor) -> tuple[int, torch.device] | None:
        try:
            return tensor.untyped_storage().data_ptr(), tensor.device
        except (RuntimeError, NotImplementedError):  # no storage (meta, some subclasses): nothing to alias
            return None

    def pack(self, tensor: torch.Tensor) -> _Saved:
        record = _Saved(tensor)
        key = self._key(tensor)
        if key is not None:
            self._by_storage.setdefault(key, weakref.WeakSet()).add(record)
        return record

    @staticmethod
    def unpack(record: _Saved) -> torch.Tensor:
        return record.tensor

    def before_write(self, tensor: torch.Tensor) -> None:
        key = self._key(tensor)
        records = self._by_storage.pop(key, None) if key is not None else None
        for record in records or ():
            # the record still holds the original (a strong reference keeps its storage from being reused)
            record.tensor = record.tensor.clone()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack), _CopyBeforeWrite(self):
            yield


def mutation_context(mode: str) -> contextlib.AbstractContextManager:
    """The context a training step (forward and backward) runs in, for mode "allow" or "clone"."""
    if mode == "allow":
        return SavedTensorCopies().active()
    if mode == "clone":
        return torch.autograd.graph.saved_tensors_hooks(torch.clone, _identity)
    raise ValueError(f"Trainer: mutation must be one of {', '.join(MUTATION_MODES)}, got '{mode}'.")


def _identity(tensor: Any) -> Any:
    return tensor


__all__ = ["MUTATION_MODES", "SavedTensorCopies", "mutation_context"]
