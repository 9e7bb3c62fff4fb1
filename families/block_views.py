"""Pieces every family's reduced and measured blocks share: the kept units of a width decision as
weight-axis selections (a fused qkv's too), an MLP run on a token subset, a submodule whose output is kept, the meter
of each head's and MLP group's share of a block's output, and the token routing of blocks whose image tokens travel
alone in their own stream."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..core.slicing import AxisSelection, ReducedLinear, RunIndexCache, WeightSource, gather_tokens, scatter_tokens
from .base import BlockInternals, BlockRef
from .capabilities import CallLayout, MlpTokenGate, TokenRouting


@functools.cache
def forward_parameters(block_class: type) -> frozenset[str]:
    """The parameter names of a host block class's forward (which keyword arguments this host version accepts)."""
    return frozenset(inspect.signature(block_class.forward).parameters)


class UnitSelections:
    """The kept heads and MLP groups of one width decision as weight-axis selections, built once per
    decision and kept in the run's `RunIndexCache`. A family's subclass sets `family` and builds its
    selections in `__init__(arch, heads, groups, group_count)`, then calls `_build_indices(device)`."""

    family: ClassVar[str]

    def _build_indices(self, device: torch.device | None) -> None:
        if device is not None:  # every gather index now, with the decision, not in a later call
            AxisSelection.build_indices(self.gathers(), device)

    def gathers(self) -> list[AxisSelection]:
        """The selections that need an index tensor (several runs of units, not one narrow)."""
        return [s for s in vars(self).values() if isinstance(s, AxisSelection) and not s.contiguous]

    @classmethod
    def key(cls, internals: BlockInternals) -> tuple:
        return (f"{cls.family}.width", internals.heads, internals.mlp_groups, internals.mlp_group_count)

    @classmethod
    def cached(cls, cache: RunIndexCache, arch: Any, internals: BlockInternals, device: torch.device) -> "UnitSelections":
        return cache.get(cls.key(internals), lambda: cls(arch, internals.heads, internals.mlp_groups, internals.mlp_group_count, device))

    @classmethod
    def prepare(cls, cache: RunIndexCache, arch: Any, decisions: Iterable[BlockInternals], device: torch.device) -> None:
        """The selections of many decisions at once, their gather indices in one host-to-device copy."""
        made = {}
        for internals in decisions:
            key = cls.key(internals)
            if (internals.heads is not None or internals.mlp_groups is not None) and key not in made and cache.peek(key) is None:
                made[key] = cls(arch, internals.heads, internals.mlp_groups, internals.mlp_group_count, None)
        AxisSelection.build_indices([s for selections in made.values() for s in selections.gathers()], device)
        for key, selections in made.items():
            cache.put(key, selections)


class FusedQkvSelections(UnitSelections):
    """Kept heads of a fused qkv (q, k and v rows of each kept head, D apart) and of the output projection's columns,
    and kept MLP groups. The family's architecture has hidden_size, num_heads, head_dim and mlp_hidden."""

    def __init__(self, arch: Any, heads: tuple[int, ...] | None, groups: tuple[int, ...] | None, group_count: int,
                 device: torch.device | None):
        d = arch.hidden_size
        self.head_count = arch.num_heads if heads is None else len(heads)
        self.head_cols = None if heads is None else AxisSelection.of_units(heads, arch.head_dim)
        self.qkv_rows = None if heads is None else self.head_cols + self.head_cols.shifted(d) + self.head_cols.shifted(2 * d)
        self.units = None if groups is None else AxisSelection.of_units(groups, arch.mlp_hidden // group_count)
        self._build_indices(device)


class ImageStreamRouting(TokenRouting):
    """Token routing where a block's `img` holds the image tokens alone (the text in a stream or context of its own)
    with their positions already added: a subset runs the block by a gather and a scatter. `mlp_output` names the
    linear whose whole output is the image tokens' MLP update."""

    mlp_output: ClassVar[str]

    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        return stream["img"]

    def select(self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        return {**args, "img": gather_tokens(args["img"], index)}

    def merge(self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        img = args["img"].clone()  # the host's blocks return new tensors: the block's input stays as it was
        img.scatter_(1, index[..., None].expand(-1, -1, img.shape[-1]), reduced_out["img"])
        return {**reduced_out, "img": img}

    def mlp_token_gates(self, block: BlockRef, layout: CallLayout) -> dict[str, MlpTokenGate]:
        return {self.mlp_output: MlpTokenGate()}


class KeptHeadsAfterNorm:
    """A q/k norm that spans every head (Wan, LTX-Video), run in full as the host runs it, then the kept heads' channels:
    a kept head's normalised q is then exactly the host's."""

    def __init__(self, norm: Callable[[torch.Tensor], torch.Tensor], heads: AxisSelection):
        self.norm, self.heads = norm, heads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads.take(self.norm(x), -1)


class ReducedBlock:
    """What every family's reduced block view starts from: the block module, the decision's internals, the FLOP log
    of the extras, and the block's linears as the call runs them (narrowed, with an extra, or overridden)."""

    def __init__(self, module: torch.nn.Module, internals: BlockInternals, flop_log: list[float]):
        self.module, self.internals, self.flop_log = module, internals, flop_log

    def linear(self, name: str, rows: AxisSelection | None = None, cols: AxisSelection | None = None,
               layer: torch.nn.Module | None = None, bias: bool = True):
        """The block's linear `name` (module path in the block, or `layer` itself) restricted to output `rows` and
        input `cols`: the host's own layer when nothing changes, a training override, or a reduced view of it."""
        layer = self.module.get_submodule(name) if layer is None else layer
        override = self.internals.overridden(layer, name, rows is not None or cols is not None or not bias)
        if override is not None:
            return override
        extra = self.internals.extras.get(name)
        if rows is None and cols is None and extra is None and bias:
            return layer  # untouched: the host's own layer, exactly as in the full block
        return ReducedLinear(layer, rows, cols, extra, self.flop_log, use_bias=bias)


class ReplacedModulation:
    """A block's modulation (`Sequential([act,] Linear)`) with its linear replaced (a LoRA extra or a trainer's)."""

    def __init__(self, linear: Callable[[torch.Tensor], torch.Tensor], act: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.linear, self.act = linear, act

    def __call__(self, c: torch.Tensor) -> torch.Tensor:
        return self.linear(c if self.act is None else self.act(c))


class TokenSubsetMLP:
    """An MLP (in -> act -> out) that runs only on the selected tokens; the others get zero output."""

    def __init__(self, mlp_in: Callable, act: Callable, mlp_out: Callable, tokens: torch.Tensor | None):
        self.mlp_in, self.act, self.mlp_out, self.tokens = mlp_in, act, mlp_out, tokens

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens is None:
            return self.mlp_out(self.act(self.mlp_in(x)))
        selected = self.mlp_out(self.act(self.mlp_in(gather_tokens(x, self.tokens))))
        return scatter_tokens(x.new_zeros(*x.shape[:-1], selected.shape[-1]), self.tokens, selected)


class Recorded:
    """A submodule whose last output is kept (a modulation: the gates the block applies later)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.output = module, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.output = self.module(*args, **kwargs)
        return self.output


class UnitMeter:
    """Sums, per attention head and per MLP group, the L2 norm of the unit's gated contribution to
    the residual stream over every token that passes the block's output linears.

    All units of a span are measured in one batched product on the device; nothing is read back
    until the caller asks for the means.
    """

    def __init__(self, heads: int, groups: int, weights: WeightSource):
        self.counts = {"heads": heads, "groups": groups}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = {"heads": 0, "groups": 0}
        self.weights = weights

    def output_linear(self, layer: torch.nn.Module, spans: list[tuple[str, int, int]], gate: Callable[[], torch.Tensor]):
        """`layer` as the block calls it, measuring the input column spans (kind, first column, unit size)."""

        def run(x: torch.Tensor) -> torch.Tensor:
            out = layer(x)
            weight, _ = self.weights(layer, x)
            gates = gate()
            for kind, start, size in spans:
                units = self.counts[kind]
                end = start + units * size
                inputs = x[..., start:end].unflatten(-1, (units, size))  # (..., U, s)
                columns = weight[:, start:end].unflatten(-1, (units, size))  # (D, U, s)
                shares = torch.einsum("...us,dus->...ud", inputs, columns) * gates.unsqueeze(-2)
                norms = shares.float().norm(dim=-1).reshape(-1, units).sum(dim=0, dtype=torch.float64)
                if kind in self.sums:
                    self.sums[kind] += norms
                else:
                    self.sums[kind] = norms
                self.tokens[kind] += x.shape[:-1].numel()
            return out

        return run

    def mean(self, kind: str) -> torch.Tensor:
        """(units,) mean share per token, on the device of the measured block."""
        sums = self.sums.get(kind)
        if sums is None or self.tokens[kind] == 0:
            return torch.zeros(self.counts[kind])
        return (sums / self.tokens[kind]).float()
