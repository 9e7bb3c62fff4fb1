"""Real compute removal inside a block: narrowed linears, token gathers, module views.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import functools
from types import FunctionType
from typing import Any, Callable, Protocol, Sequence

import torch

# Where the *effective* weight of a linear comes from (cast, dequantised, LoRA applied), for work
# that needs the weight itself rather than the layer's output (the width calibration's unit meter).
WeightSource = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def plain_weights(layer: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of a plain torch Linear, cast like the input (the host integration supplies a better source)."""
    bias = layer.bias.to(like) if layer.bias is not None else None
    return layer.weight.to(like), bias


def device_index(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """A long index tensor on `device` without stalling the host: pinned memory, asynchronous copy."""
    host = torch.tensor(list(values), dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


class AxisSelection:
    """Indices kept along one axis of a weight (or sequence), built once per decision.

    Stored as sorted runs `(start, stop)`; a single run is taken with `narrow` (a view), several
    with one `index_select` whose index tensor is made on first use per device and kept.
    """

    __slots__ = ("runs", "size", "_index")

    def __init__(self, runs: Sequence[tuple[int, int]]):
        merged: list[list[int]] = []
        for start, stop in sorted(runs):
            if stop <= start:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        if not merged:
            raise ValueError("an axis selection must keep at least one index")
        self.runs = tuple((a, b) for a, b in merged)
        self.size = sum(b - a for a, b in self.runs)
        self._index: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def of_units(cls, units: Sequence[int], unit_size: int, offset: int = 0) -> "AxisSelection":
        """The indices of `units` when the axis is split into consecutive units of `unit_size`."""
        return cls([(offset + u * unit_size, offset + (u + 1) * unit_size) for u in units])

    @classmethod
    def span(cls, start: int, stop: int) -> "AxisSelection":
        return cls([(start, stop)])

    def shifted(self, offset: int) -> "AxisSelection":
        return AxisSelection([(a + offset, b + offset) for a, b in self.runs])

    def __add__(self, other: "AxisSelection") -> "AxisSelection":
        return AxisSelection(self.runs + other.runs)

    @property
    def contiguous(self) -> bool:
        return len(self.runs) == 1

    def values(self) -> list[int]:
        return [i for a, b in self.runs for i in range(a, b)]

    def index(self, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        found = self._index.get(device)
        if found is None:
            found = self._index[device] = device_index(self.values(), device)
        return found

    @staticmethod
    def build_indices(selections: "Sequence[AxisSelection]", device: torch.device | str) -> None:
        """Make the index tensors of many selections in one host-to-device copy (e.g. every decision of a run)."""
        device = torch.device(device)
        missing = list({id(s): s for s in selections if not s.contiguous and device not in s._index}.values())
        if not missing:
            return
        everything = device_index([i for s in missing for i in s.values()], device)
        for selection, index in zip(missing, everything.split([s.size for s in missing])):
            selection._index[device] = index

    def take(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """`tensor` restricted to the kept indices along `dim`: a view when contiguous."""
        if self.contiguous:
            start, stop = self.runs[0]
            return tensor.narrow(dim, start, stop - start)
        return tensor.index_select(dim, self.index(tensor.device))

    def __repr__(self) -> str:
        return f"AxisSelection({list(self.runs)})"


def unit_indices(units: Sequence[int], unit_size: int, device: torch.device | str) -> torch.Tensor:
    """Indices of the channels of `units` when channels are split into consecutive groups (off the hot path)."""
    if not len(units):
        return torch.empty(0, dtype=torch.long, device=device)
    return AxisSelection.of_units(units, unit_size).index(device)


class LinearExtra(Protocol):
    """Something added to a linear layer's output, e.g. a LoRA bypass; must follow the same narrowing."""

    def __call__(self, x: torch.Tensor, rows: AxisSelection | None, cols: AxisSelection | None) -> torch.Tensor:
        """The addend for output `rows` given the input `x` restricted to input columns `cols`."""

    def flops(self, tokens: int, in_features: int, out_features: int) -> float:
        ...


def _is_plain_tensor(tensor: torch.Tensor | None) -> bool:
    return tensor is None or type(tensor) in (torch.Tensor, torch.nn.Parameter)


def narrowed_layer(
    layer: torch.nn.Module, rows: AxisSelection | None, cols: AxisSelection | None, use_bias: bool = True
) -> torch.nn.Module:
    """A shallow copy of a linear layer that holds only the kept rows / columns of its weight.

    Calling it runs the layer class's own forward, so the host's casting, quantised matmuls and
    weight functions apply to exactly the part that is used. The layer itself is never modified.
    """
    reduced = object.__new__(type(layer))  # shares every tensor; its own attribute and parameter dicts
    reduced.__dict__ = dict(layer.__dict__)
    reduced._parameters = dict(layer._parameters)
    reduced._buffers = dict(layer._buffers)
    weight, bias = layer._parameters.get("weight"), layer._parameters.get("bias")
    weight_functions = list(getattr(layer, "weight_function", None) or ())
    bias_functions = list(getattr(layer, "bias_function", None) or ())
    if not use_bias:
        reduced._parameters["bias"] = bias = None
        bias_functions = []
    if weight_functions or bias_functions or not _is_plain_tensor(weight) or not _is_plain_tensor(bias):
        # The host's weight functions (e.g. LoRA patches under low-VRAM loading) and quantised
        # tensor subclasses need the whole weight: narrow after them, inside the host's own cast.
        def narrow_weight(w: torch.Tensor) -> torch.Tensor:
            w = rows.take(w, 0) if rows is not None else w
            return cols.take(w, 1) if cols is not None else w

        reduced.weight_function = [*weight_functions, narrow_weight]
        if bias is not None and rows is not None:
            reduced.bias_function = [*bias_functions, lambda b: rows.take(b, 0)]
        reduced.comfy_cast_weights = True
        return reduced
    w = rows.take(weight, 0) if rows is not None else weight
    w = cols.take(w, 1) if cols is not None else w
    if w.dtype.itemsize == 1 and not w.is_contiguous():
        w = w.contiguous()  # fp8 matmul kernels want dense weights; this is the kept part only
    reduced._parameters["weight"] = w
    if bias is not None and rows is not None:
        reduced._parameters["bias"] = rows.take(bias, 0)
    return reduced


class ReducedLinear:
    """A linear layer restricted to output `rows` and input `cols`, with an optional extra (LoRA bypass)."""

    def __init__(
        self,
        layer: torch.nn.Module,
        rows: AxisSelection | None = None,
        cols: AxisSelection | None = None,
        extra: LinearExtra | None = None,
        flop_log: list[float] | None = None,
        use_bias: bool = True,  # False for the second half of a split matmul whose first half adds it
    ):
        self.layer, self.rows, self.cols, self.extra, self.flop_log = layer, rows, cols, extra, flop_log
        self.use_bias = use_bias

    @property
    def out_features(self) -> int:
        return self.rows.size if self.rows is not None else int(self.layer.weight.shape[0])

    @property
    def in_features(self) -> int:
        return self.cols.size if self.cols is not None else int(self.layer.weight.shape[1])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None and self.cols is None and self.use_bias:
            out = self.layer(x)
        elif "forward" in self.layer.__dict__:
            out = self._through_replaced_forward(x)
        else:
            reduced = narrowed_layer(self.layer, self.rows, self.cols, self.use_bias)
            out = type(self.layer).forward(reduced, x)  # not __call__: the layer's hooks expect its full shape
        if self.extra is not None:
            out = out + self.extra(x, self.rows, self.cols)
            if self.flop_log is not None:
                self.flop_log.append(self.extra.flops(x.shape[:-1].numel(), self.in_features, self.out_features))
        return out

    def _through_replaced_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Another node replaced this layer's forward (e.g. ComfyUI's bypass-mode LoRA): its code expects the
        whole layer, so run it on the input with zeros in the dropped columns and keep the kept rows. Exact for
        a forward that is affine in its input; this layer then costs its full FLOPs."""
        layer = self.layer
        full_in = int(layer.weight.shape[1])
        if self.cols is not None:
            padded = x.new_zeros(*x.shape[:-1], full_in)
            padded.index_copy_(-1, self.cols.index(x.device), x)
            x = padded
        out = layer(x)
        if not self.use_bias:
            out = out - layer(x.new_zeros(1, full_in))[0]
        return self.rows.take(out, out.ndim - 1) if self.rows is not None else out


class ModuleView:
    """Stands in for a module: overridden attributes first, everything else from the real module.

    Calling a view runs the real module class's `forward` with the view as `self`, so the host's own
    forward code runs on the reduced pieces; nothing of it is copied.
    """

    def __init__(self, base: torch.nn.Module, **overrides: Any):
        object.__setattr__(self, "_base", base)
        for name, value in overrides.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        base = object.__getattribute__(self, "_base")
        method = _own_method(type(base), name)
        if method is not None:  # the block's own methods run on the view too (SD3's pre_attention / post_attention)
            return method.__get__(self)
        return getattr(base, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self._base).forward(self, *args, **kwargs)


@functools.cache
def _own_method(cls: type, name: str) -> Any:
    """A plain function the host's module class defines (not one of torch.nn.Module's own), or None. Cached: a view's
    attribute lookups run in every reduced block call."""
    if hasattr(torch.nn.Module, name):
        return None
    for klass in cls.__mro__:
        if name in klass.__dict__:
            found = klass.__dict__[name]
            return found if isinstance(found, FunctionType) else None
    return None


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C) at per-sample token indices (B, k) -> (B, k, C)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of `base` (B, N, C) with rows `index` (B, k) replaced by `values` (B, k, C)."""
    return base.scatter(1, index[..., None].expand(-1, -1, base.shape[-1]), values)


def gather_sequence(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x (b, ..., L, ...) with its sequence along `dim` restricted to per-sample positions `index` (B, L').

    `b` may be 1 (shared by the batch, e.g. RoPE tables) or B; the result has batch B.
    """
    batch, length = index.shape
    shape = [batch, *x.shape[1:]]
    shape[dim] = length
    view = [batch] + [1] * (x.ndim - 1)
    view[dim] = length
    expanded = x.expand(batch, *x.shape[1:])
    return expanded.gather(dim, index.reshape(view).expand(shape))


def gather_square_mask(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """An attention mask (..., L, L) over a sequence, restricted to positions `index` (B, L') as queries and keys.

    Accepts the layouts attention functions accept ((L, L), (b, L, L), (b, heads, L, L), b in {1, B})
    and returns one with batch B and the same number of dimensions (at least 3).
    """
    if mask.ndim == 2:
        mask = mask[None]
    rows = gather_sequence(mask, index, dim=mask.ndim - 2)
    return gather_sequence(rows, index, dim=mask.ndim - 1)


class RunIndexCache:
    """Per-run cache of small index tensors that depend only on shapes (e.g. the text positions of a
    joint sequence), so a block call launches no kernels to rebuild them."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}

    def get(self, key: tuple, build: Any) -> Any:
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = build()
        return found

    def peek(self, key: tuple) -> Any:
        return self._entries.get(key)

    def put(self, key: tuple, value: Any) -> None:
        self._entries[key] = value

    def clear(self) -> None:
        self._entries.clear()
