"""Real compute removal inside a block: sliced linears, cached sliced weights, module views.

A block is run *reduced* by calling its own class's `forward` on a `ModuleView`: an object that
answers every attribute from the real block except the few it overrides (a head count, sliced
linears, a token-subset MLP). Linears are sliced on their *effective* weights, the ones the host
would use (cast, LoRA-patched, offloaded weights brought to the device), so everything the host
does to weights is honoured; sliced weights are cached for the sampling run.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Protocol

import torch
import torch.nn.functional as F

WeightSource = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def plain_weights(layer: torch.nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of a plain torch Linear, cast like the input (the host integration supplies a better source)."""
    bias = layer.bias.to(like) if layer.bias is not None else None
    return layer.weight.to(like), bias


class LinearExtra(Protocol):
    """Something added to a linear layer's output, e.g. a LoRA bypass; must follow the same slicing."""

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        """The addend for output `rows` given the input `x` restricted to input columns `cols`."""

    def flops(self, tokens: int, in_features: int, out_features: int) -> float:
        ...


class WeightSlices:
    """Effective weights of linear layers, sliced by (rows, cols) and kept for reuse within a run.

    Entries are keyed by the layer and a small hashable slice signature (e.g. the kept head tuple),
    and remember the parameter's storage and version, so an in-place weight change invalidates
    them. `max_bytes` bounds the cache (least recently used entries go first); it may be a function,
    asked once when the first slice is stored, for a budget that depends on memory free only after
    the host has loaded the model.
    """

    def __init__(self, source: WeightSource = plain_weights, max_bytes: int | Callable[[], int] | None = None):
        self._source = source
        self._max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Hashable, torch.Tensor, torch.Tensor | None, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def get(
        self,
        layer: torch.nn.Module,
        like: torch.Tensor,
        signature: Hashable,
        rows: torch.Tensor | None,
        cols: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        key = (id(layer), signature, like.dtype, like.device)
        weight_param = layer.weight
        stamp = (weight_param.data_ptr(), weight_param._version, getattr(layer.bias, "_version", None))
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1], entry[2]
        self.misses += 1
        weight, bias = self._source(layer, like)
        if rows is not None:
            weight = weight.index_select(0, rows)
            bias = bias.index_select(0, rows) if bias is not None else None
        if cols is not None:
            weight = weight.index_select(1, cols)
        weight = weight.contiguous()
        size = weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
        if entry is not None:
            self._drop(key)
        if callable(self._max_bytes):
            self._max_bytes = max(0, int(self._max_bytes()))
        if self._max_bytes is None or size <= self._max_bytes:
            self._entries[key] = (stamp, weight, bias, size)
            self._bytes += size
            while self._max_bytes is not None and self._bytes > self._max_bytes:
                self._drop(next(iter(self._entries)))
        return weight, bias

    def _drop(self, key: Hashable) -> None:
        self._bytes -= self._entries.pop(key)[3]

    @property
    def source(self) -> WeightSource:
        """Where effective (unsliced) weights come from, for work that must not fill the cache."""
        return self._source

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


class SlicedLinear:
    """A linear layer restricted to output `rows` and input `cols`, with optional extras (LoRA)."""

    def __init__(
        self,
        layer: torch.nn.Module,
        weights: WeightSlices,
        signature: Hashable,
        rows: torch.Tensor | None = None,
        cols: torch.Tensor | None = None,
        extra: LinearExtra | None = None,
        flop_log: list[float] | None = None,
        use_bias: bool = True,  # False for the second half of a split matmul whose first half adds it
    ):
        self.layer, self.weights, self.signature = layer, weights, signature
        self.rows, self.cols, self.extra, self.flop_log = rows, cols, extra, flop_log
        self.use_bias = use_bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weights.get(self.layer, x, self.signature, self.rows, self.cols)
        out = F.linear(x, weight, bias if self.use_bias else None)
        if self.extra is not None:
            out = out + self.extra(x, self.rows, self.cols)
            if self.flop_log is not None:
                self.flop_log.append(self.extra.flops(x.shape[:-1].numel(), weight.shape[1], weight.shape[0]))
        return out


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
        return getattr(object.__getattribute__(self, "_base"), name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self._base).forward(self, *args, **kwargs)


def unit_indices(groups: tuple[int, ...], group_size: int, device: torch.device) -> torch.Tensor:
    """Indices of the channels of `groups` when channels are split into consecutive groups."""
    starts = torch.tensor(groups, dtype=torch.long, device=device) * group_size
    return (starts[:, None] + torch.arange(group_size, device=device)[None, :]).reshape(-1)


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
