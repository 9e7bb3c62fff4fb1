"""Token Router: image tokens that skip the MLP (DyDiT SDT) or the whole block (DiffCR), or reuse it.

The reasoning and the equations: docs/methods/token_router.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Sequence

import torch

from ...families import BlockInternals, BlockRef, UnsupportedModelError
from ...core.flops import FlopBreakdown
from ...core.slicing import gather_tokens
from ...core.method import BlockArgs, BlockFn, DynamicMethod, register
from .file import router_flops, router_scores
from .settings import TokenRouterSettings, keep_count

if TYPE_CHECKING:
    from ...core.executor import CallState, Chunk, RunContext

SKETCH_SIZE = 64  # random projection of a token's input for the input-change score
_EPS = 1e-6


# --- runtime -------------------------------------------------------------------------------------
@dataclass
class _History:
    """What one block remembers about the tokens of one or more batch chunks (rows)."""

    tokens: int
    update_size: torch.Tensor | None = None  # (B, N) float32: |update| / |input| when the token last ran
    age: torch.Tensor | None = None  # (B, N) float32: calls since the token last ran the block
    sketch: torch.Tensor | None = None  # (B, N, SKETCH_SIZE) float32: projected input when the token last ran
    cache: torch.Tensor | None = None  # (B, N, D) compute dtype: the update the token got last time

    @property
    def rows(self) -> int:
        present = next(t for t in (self.update_size, self.sketch, self.cache) if t is not None)
        return present.shape[0]

    def _fields(self) -> tuple[str, ...]:
        return ("update_size", "age", "sketch", "cache")

    @classmethod
    def concat(cls, parts: list["_History"]) -> "_History":
        if len(parts) == 1:
            return parts[0]
        merged = {}
        for name in parts[0]._fields():
            values = [getattr(p, name) for p in parts]
            merged[name] = None if values[0] is None else torch.cat(values, dim=0)
        return cls(parts[0].tokens, **merged)

    def rows_of(self, rows: slice) -> "_History":
        return _History(self.tokens, **{n: None if getattr(self, n) is None else getattr(self, n)[rows] for n in self._fields()})


@dataclass
class _CallSummary:
    record: Any = None
    routed: int = 0
    kept_fraction: float = 0.0
    without_history: int = 0


@register
class TokenRouterMethod(DynamicMethod):
    settings_type = TokenRouterSettings
    order = 20
    settings: TokenRouterSettings

    def __init__(self, settings: TokenRouterSettings, run: "RunContext") -> None:
        super().__init__(settings, run)
        blocks = run.adapter.blocks
        routing = run.adapter.token_routing()
        if routing is None:  # settings are validated when applied, so only a changed model gets here
            raise UnsupportedModelError(f"Token Router: {run.adapter.display_name} models cannot route tokens yet.")
        self._routing = routing
        self._blocks = blocks
        self._position = {block: i for i, block in enumerate(blocks)}
        self._routed = {block for i, block in enumerate(blocks) if settings.lowest_ratio(blocks, i) < 1.0}
        self._router = settings.router if settings.score == "router" else None
        if self._router is not None:  # blocks the file has no router for run in full
            self._routed = {block for block in self._routed if block.label in self._router.routers}
        self._gated = self._router is not None and self._router.router == "diffcr" and settings.mode != "sdt"
        self._keeps_update_size = settings.score == "update"
        self._keeps_sketch = settings.score == "input_change"
        self._keeps_cache = settings.mode == "reuse"
        self._needs_history = self._keeps_update_size or self._keeps_sketch or self._keeps_cache
        self._history: dict[tuple[BlockRef, Hashable], _History] = {}  # per block and cond/uncond chunk
        self._batched: dict[BlockRef, tuple[tuple, _History, tuple[_History, ...]]] = {}
        self._router_params: dict[tuple[str, torch.dtype, torch.device], dict[str, torch.Tensor]] = {}
        self._projection: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._mlp_tokens: dict[BlockRef, tuple[torch.Tensor, int, int]] = {}
        self._summary = _CallSummary()
        self._ratio_cache: dict[float, torch.Tensor | None] = {}

    def finish(self) -> None:
        self._history.clear()
        self._batched.clear()
        self._router_params.clear()
        self._projection.clear()
        self._mlp_tokens.clear()
        self._summary = _CallSummary()

    # --- keep ratio ---------------------------------------------------------------------------
    def _ratio(self, block: BlockRef, percent: float) -> float:
        file_ratios = None
        if self.settings.uses_file_ratios:
            if percent not in self._ratio_cache:
                self._ratio_cache[percent] = self.settings.router.region_ratios(percent)
            file_ratios = self._ratio_cache[percent]
        return self.settings.block_ratio(self._blocks, self._position[block], percent, file_ratios)

    # --- the block hook -----------------------------------------------------------------------
    def wrap_block(self, call: "CallState", block: BlockRef, args: BlockArgs, proceed: BlockFn) -> dict:
        if block not in self._routed:
            return proceed(args)
        x = self._routing.image_tokens(block, args, call.layout)
        batch, tokens = x.shape[0], x.shape[1]
        percent = call.step.percent
        k = keep_count(self._ratio(block, percent), tokens)
        history = self._load_history(block, call.chunks, batch, tokens) if self._needs_history else None
        observe = self._needs_history and percent <= self.settings.end_percent
        if k >= tokens or (self._needs_history and history is None):
            without_history = k < tokens
            self._note(call, block, tokens, tokens, without_history=without_history)
            return self._run_full(call, block, args, proceed, x, observe)

        sketch = self._sketch(call, x) if self._keeps_sketch else None
        scores, gates = self._scores(call, block, x, history, sketch)
        index = torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values
        if gates is not None:
            gates = gates.gather(1, index)
        self._note(call, block, k, tokens)
        if self.settings.mode == "sdt":
            return self._run_sdt(call, block, args, proceed, x, index, history, sketch)
        return self._run_subset(call, block, args, proceed, x, index, history, sketch, gates)

    def block_internals(self, call: "CallState", block: BlockRef, args: BlockArgs, internals: BlockInternals) -> BlockInternals:
        pending = self._mlp_tokens.get(block)
        if pending is None:
            return internals
        index, batch, tokens = pending
        x = self._routing.image_tokens(block, args, call.layout)
        if x.shape[0] != batch or x.shape[1] != tokens:
            return internals  # something between our wrapper and the block changed the tokens: leave it full
        return internals.with_changes(mlp_tokens=index)

    # --- the three ways to run a block -----------------------------------------------------------
    def _run_full(self, call, block, args, proceed, x, observe: bool) -> dict:
        before = x.clone() if observe and (self._keeps_update_size or self._keeps_cache) else None
        sketch = self._sketch(call, x) if observe and self._keeps_sketch else None
        out = proceed(args)
        if observe:
            after = self._routing.image_tokens(block, out, call.layout)
            update = after - before if before is not None else None
            history = _History(after.shape[1])
            if self._keeps_update_size:
                history.update_size = _relative_size(update, before)
                history.age = torch.zeros_like(history.update_size)
            if self._keeps_sketch:
                history.sketch = sketch
            if self._keeps_cache:
                history.cache = update
            self._store_history(block, call.chunks, history)
        return out

    def _run_sdt(self, call, block, args, proceed, x, index, history, sketch) -> dict:
        before = x.clone() if self._keeps_update_size else None
        self._mlp_tokens[block] = (index, x.shape[0], x.shape[1])
        try:
            out = proceed(args)
        finally:
            self._mlp_tokens.pop(block, None)
        if history is not None:
            after = self._routing.image_tokens(block, out, call.layout)
            if self._keeps_update_size:
                # every token ran attention, so every token's update is fresh; age counts skipped MLPs
                history.update_size.copy_(_relative_size(after - before, before))
            self._refresh(history, index, sketch)
        return out

    def _run_subset(self, call, block, args, proceed, x, index, history, sketch, gates) -> dict:
        routing, layout = self._routing, call.layout
        kept_input = gather_tokens(x, index)  # x itself stays untouched until the merge
        reduced_out = proceed(routing.select(block, args, index, layout))
        kept_output = routing.image_tokens(block, reduced_out, layout)
        if gates is not None:  # DiffCR: out = x + s * (block(x) - x) for the kept tokens
            kept_output.sub_(kept_input).mul_(gates[..., None].to(kept_output.dtype)).add_(kept_input)
        kept_update = kept_output - kept_input if history is not None else None
        if self._keeps_cache:
            x.add_(history.cache)  # the tokens left out get last time's update; the kept ones are overwritten next
        out = routing.merge(block, args, reduced_out, index, layout)
        if history is not None:
            expanded = index[..., None]
            if self._keeps_update_size:
                history.update_size.scatter_(1, index, _relative_size(kept_update, kept_input))
            if self._keeps_cache:
                history.cache.scatter_(1, expanded.expand(-1, -1, x.shape[-1]), kept_update)
            self._refresh(history, index, sketch)
        return out

    # --- scores -------------------------------------------------------------------------------
    def _scores(self, call, block, x, history, sketch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N) scores, higher = keep; and the DiffCR gates of the tokens (B, N) when the update is scaled."""
        if self._router is not None:
            params = self._router.routers[block.label]
            scores = self._router_scores(x, block, params)
            call.add_executed(FlopBreakdown(extra=router_flops(self._router.router, params, x.shape[0] * x.shape[1])))
            gates = scores if self._gated else None
            return scores, gates
        if self._keeps_update_size:
            return history.update_size * (1.0 + history.age), None
        change = (sketch - history.sketch).norm(dim=-1) / (history.sketch.norm(dim=-1) + _EPS)
        return change, None

    def _router_scores(self, x: torch.Tensor, block: BlockRef, params) -> torch.Tensor:
        key = (block.label, x.dtype, x.device)
        weights = self._router_params.get(key)
        if weights is None:
            weights = self._router_params[key] = {n: t.to(device=x.device, dtype=x.dtype) for n, t in params.items()}
        return router_scores(self._router.router, weights, x)

    def _sketch(self, call, x: torch.Tensor) -> torch.Tensor:
        """A fixed random projection of every token (B, N, SKETCH_SIZE), float32: norms of differences survive it."""
        key = (x.shape[-1], x.device)
        projection = self._projection.get(key)
        if projection is None:
            generator = torch.Generator().manual_seed(0)
            projection = torch.randn(x.shape[-1], SKETCH_SIZE, generator=generator) / math.sqrt(SKETCH_SIZE)
            projection = self._projection[key] = projection.to(x.device)
        call.add_executed(FlopBreakdown(extra=2.0 * x.shape[0] * x.shape[1] * x.shape[-1] * SKETCH_SIZE))
        return x.float() @ projection

    # --- history ------------------------------------------------------------------------------
    @staticmethod
    def _chunk_keys(chunks: Sequence["Chunk"]) -> tuple[Hashable, ...]:
        """One key per chunk: its kind and conditioning uuid (the position without one), made unique in the call."""
        keys: list[Hashable] = []
        for position, chunk in enumerate(chunks):
            base = (chunk.kind, chunk.uuid if chunk.uuid is not None else position)
            keys.append(base + (sum(1 for key in keys if key[:2] == base),))
        return tuple(keys)

    def _load_history(self, block: BlockRef, chunks: Sequence["Chunk"], batch: int, tokens: int) -> _History | None:
        """The block's history for the rows of this call, or None when some chunk has none that fits."""
        keys = self._chunk_keys(chunks)
        parts = []
        for key, chunk in zip(keys, chunks):
            history = self._history.get((block, key))
            if history is None or history.tokens != tokens or history.rows != chunk.rows.stop - chunk.rows.start:
                return None
            parts.append(history)
        if not parts or sum(p.rows for p in parts) != batch:
            return None
        if len(parts) == 1:
            return parts[0]
        batched = self._batched.get(block)
        if batched is not None and batched[0] == keys and all(a is b for a, b in zip(batched[2], parts)):
            return batched[1]  # the chunks' histories are still views of this batch: no copy
        merged = _History.concat(parts)
        self._store_history(block, chunks, merged)
        return merged

    def _store_history(self, block: BlockRef, chunks: Sequence["Chunk"], history: _History) -> None:
        keys = self._chunk_keys(chunks)
        if len(chunks) == 1:
            self._history[(block, keys[0])] = history
            return
        parts = tuple(history.rows_of(chunk.rows) for chunk in chunks)
        for key, part in zip(keys, parts):
            self._history[(block, key)] = part
        self._batched[block] = (keys, history, parts)

    def _refresh(self, history: _History, index: torch.Tensor, sketch: torch.Tensor | None) -> None:
        """The tokens `index` just ran the block: their age restarts and their input sketch is the new reference."""
        if history.age is not None:
            history.age.add_(1.0).scatter_(1, index, 0.0)
        if history.sketch is not None and sketch is not None:
            expanded = index[..., None].expand(-1, -1, sketch.shape[-1])
            history.sketch.scatter_(1, expanded, sketch.gather(1, expanded))

    # --- telemetry ----------------------------------------------------------------------------
    def _note(self, call: "CallState", block: BlockRef, kept: int, tokens: int, without_history: bool = False) -> None:
        call.record.note_block(block.label, "tokens", kept)
        call.record.note_block(block.label, "of", tokens)
        summary = self._summary
        if summary.record is not call.record:
            summary = self._summary = _CallSummary(call.record)
        if without_history:
            summary.without_history += 1
        elif kept < tokens:
            summary.routed += 1
            summary.kept_fraction += kept / tokens
        parts = []
        if summary.routed:
            parts.append(f"{self.settings.mode} keep {summary.kept_fraction / summary.routed:.2f} ({_blocks(summary.routed)})")
        if summary.without_history:
            parts.append(f"{_blocks(summary.without_history)} full: no history yet")
        if parts:
            call.record.methods[self.name] = ", ".join(parts)


def _relative_size(update: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """|update| / |reference| per token, float32 (B, N)."""
    return update.float().norm(dim=-1) / (reference.float().norm(dim=-1) + _EPS)


def _blocks(count: int) -> str:
    return f"{count} block" if count == 1 else f"{count} blocks"
