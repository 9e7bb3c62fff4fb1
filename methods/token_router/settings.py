"""The Token Router's settings: modes, scores, the keep-ratio schedule and per-block overrides
(the runtime is `runtime.py`, the router file format `file.py`)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch

from ...families import BlockRef, UnsupportedModelError
from ...core.plan import MethodSettings
from .file import RouterFile

if TYPE_CHECKING:
    from ...families import ModelAdapter

MODES = ("sdt", "diffcr", "reuse")
TRAINED_MODES = {"diffcr": "diffcr", "dydit": "sdt"}  # a trained file's router kind -> the mode its student ran
SCORES = ("update", "input_change", "router")


@dataclass(frozen=True)
class BlockOverride:
    """A keep ratio for the blocks `first..last` (inclusive) of one kind, e.g. `single:10-30=0.5`."""

    kind: str
    first: int
    last: int | None  # None: to the last block of that kind
    ratio: float
    text: str  # as the user wrote it, for error messages

    def covers(self, block: BlockRef) -> bool:
        return block.kind == self.kind and self.first <= block.index and (self.last is None or block.index <= self.last)


_OVERRIDE = re.compile(r"^\s*([A-Za-z_]\w*)\s*(?::\s*(\*|\d+)\s*(?:-\s*(\d+)\s*)?)?=\s*([^\s=]+)\s*$")


def parse_block_overrides(text: str) -> tuple[BlockOverride, ...]:
    """`single:10-30=0.5, double:0=1.0, single=0.7` -> overrides (later items win). ValueError names the bad part."""
    overrides = []
    for part in filter(None, (p.strip() for p in re.split(r"[,;\n]", text or ""))):
        match = _OVERRIDE.match(part)
        if match is None:
            raise ValueError(
                f"Token Router: cannot read the block override '{part}'. Write kind:index=ratio, kind:first-last=ratio, "
                f"kind:*=ratio or kind=ratio, e.g. 'single:10-30=0.5, double:0=1.0'."
            )
        kind, first, last, ratio_text = match.groups()
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise ValueError(f"Token Router: block override '{part}': '{ratio_text}' is not a number.") from None
        if not (math.isfinite(ratio) and 0.0 < ratio <= 1.0):
            raise ValueError(f"Token Router: block override '{part}': the keep ratio must be in (0, 1], got {ratio_text}.")
        if first is None or first == "*":
            start, end = 0, None
        else:
            start = int(first)
            end = int(last) if last is not None else start
            if end < start:
                raise ValueError(f"Token Router: block override '{part}': the range {start}-{end} runs backwards.")
        overrides.append(BlockOverride(kind, start, end, ratio, part))
    return tuple(overrides)


@dataclass(frozen=True)
class TokenRouterSettings(MethodSettings):
    method: ClassVar[str] = "token_router"

    mode: str = "reuse"
    keep_start: float = 0.5  # keep ratio at start_percent (the noisiest routed step)
    keep_end: float = 0.5  # keep ratio at end_percent; linear in sigma percent in between
    first_full: int = 2  # the first N blocks (execution order) always run in full
    last_full: int = 2
    overrides: tuple[BlockOverride, ...] = ()
    score: str = "input_change"
    router: RouterFile | None = field(default=None, compare=False)
    router_name: str = ""
    file_ratios: bool = True  # use the router file's learned ratios when it has them
    start_percent: float = 0.0  # routing happens only for sigma percent in [start, end]
    end_percent: float = 1.0

    def validate(self, adapter: "ModelAdapter") -> None:
        if adapter.token_routing() is None:
            raise UnsupportedModelError(f"Token Router: {adapter.display_name} models cannot route tokens yet.")
        if self.mode not in MODES:
            raise ValueError(f"Token Router: mode must be one of {', '.join(MODES)}, got {self.mode!r}.")
        if self.score not in SCORES:
            raise ValueError(f"Token Router: score must be one of {', '.join(SCORES)}, got {self.score!r}.")
        for name in ("keep_start", "keep_end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise ValueError(f"Token Router: {name} must be in (0, 1], got {value}.")
        for name in ("first_full", "last_full"):
            if getattr(self, name) < 0:
                raise ValueError(f"Token Router: {name} must be 0 or more, got {getattr(self, name)}.")
        if not (0.0 <= self.start_percent <= self.end_percent <= 1.0):
            raise ValueError(
                f"Token Router: need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and {self.end_percent}."
            )
        counts: dict[str, int] = {}
        for block in adapter.blocks:
            counts[block.kind] = counts.get(block.kind, 0) + 1
        for override in self.overrides:
            if override.kind not in counts:
                raise ValueError(
                    f"Token Router: block override '{override.text}': this model has no '{override.kind}' blocks "
                    f"(it has {', '.join(counts)})."
                )
            top = counts[override.kind] - 1
            if override.first > top or (override.last is not None and override.last > top):
                raise ValueError(
                    f"Token Router: block override '{override.text}': {override.kind} blocks are numbered 0-{top}."
                )
        if self.router is not None:
            self.router.check_model(adapter)
        if self.score == "router":
            if self.router is None:
                raise ValueError("Token Router: the score 'router file' needs a router file; pick one or a training-free score.")
            if not self.router.routers:
                raise ValueError(f"Token Router: router file '{self.router.name}' holds only ratios, no routers to score with.")

    @classmethod
    def as_trained(cls, router: RouterFile, overrides: tuple[BlockOverride, ...] = ()) -> "TokenRouterSettings":
        """How a trained file runs (what the trainer's student computed): its routers score, its learned ratios
        decide every block at every step (no first/last full blocks, the whole schedule). A DiffCR file's kept
        tokens run the block, their update scaled by the router's score; a DyDiT file's (SDT) run the MLP, every
        token the attention. Block overrides still win."""
        if router.router not in TRAINED_MODES or router.ratios is None:
            raise ValueError(f"Token Router: 'as trained' needs a trained file with routers and ratios (DiffCR or DyDiT "
                             f"SDT); '{router.name}' holds {router.describe()}.")
        return cls(mode=TRAINED_MODES[router.router], score="router", router=router, router_name=router.name, file_ratios=True,
                   first_full=0, last_full=0, start_percent=0.0, end_percent=1.0, overrides=overrides)

    @property
    def uses_file_ratios(self) -> bool:
        return self.file_ratios and self.router is not None and self.router.ratios is not None

    @property
    def enabled(self) -> bool:
        """False when no block can get a keep ratio below 1 (then the model runs exactly as unpatched)."""
        if any(o.ratio < 1.0 for o in self.overrides):
            return True
        if self.uses_file_ratios:
            return bool((self.router.ratios < 1.0).any())
        return min(self.keep_start, self.keep_end) < 1.0

    def describe(self) -> str:
        if self.uses_file_ratios:
            ratios = f"ratios of {self.router.name}"
        elif self.keep_start == self.keep_end:
            ratios = f"keep {self.keep_start:g}"
        else:
            ratios = f"keep {self.keep_start:g}->{self.keep_end:g}"
        if self.score == "router":
            score = f"router {self.router.name}" if self.router is not None else "router"
        else:
            score = {"update": "update magnitude", "input_change": "input change"}[self.score]
        return f"token router ({self.mode}, {ratios}, {score})"

    # --- keep ratios ------------------------------------------------------------------------------
    def block_ratio(self, blocks: Sequence[BlockRef], position: int, percent: float, file_ratios: torch.Tensor | None) -> float:
        """Keep ratio of block `blocks[position]` at sigma percent `percent` (1.0 = the full block).

        Layers: the schedule (or the file's learned ratios), then the first/last full blocks, then
        the overrides (later ones win); outside [start_percent, end_percent] every block is full.
        """
        if not (self.start_percent <= percent <= self.end_percent):
            return 1.0
        if file_ratios is not None:
            ratio = float(file_ratios[position])
        else:
            span = self.end_percent - self.start_percent
            t = (percent - self.start_percent) / span if span > 0 else 0.0
            ratio = self.keep_start + (self.keep_end - self.keep_start) * t
        if position < self.first_full or position >= len(blocks) - self.last_full:
            ratio = 1.0
        for override in self.overrides:
            if override.covers(blocks[position]):
                ratio = override.ratio
        return ratio

    def lowest_ratio(self, blocks: Sequence[BlockRef], position: int) -> float:
        """The lowest keep ratio a block can get in a run (1.0: it is never routed)."""
        if self.uses_file_ratios:
            regions = self.router.ratios.shape[0]
            bounds = self.router.ratio_bounds
            probes = [float(bounds[r] + bounds[r + 1]) / 2 for r in range(regions)]
            # region ratios apply wherever the region overlaps the routing window
            values = [
                self.block_ratio(blocks, position, min(max(p, self.start_percent), self.end_percent), self.router.ratios[r])
                for r, p in enumerate(probes)
                if float(bounds[r + 1]) >= self.start_percent and float(bounds[r]) <= self.end_percent
            ]
            return min(values, default=1.0)
        return min(self.block_ratio(blocks, position, p, None) for p in (self.start_percent, self.end_percent))


def keep_count(ratio: float, tokens: int) -> int:
    """k = ceil(ratio * N), at least 1 and at most N."""
    return max(1, min(tokens, math.ceil(ratio * tokens - 1e-9)))
