"""Timestep-wise dynamic width (DyDiT TDW) with the compute really removed.

The reasoning and the equations: docs/methods/width.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ...families import BlockInternals, BlockRef, CallLayout, ModelAdapter, UnsupportedModelError
from ...core.flops import FlopBreakdown
from ...core.steps import invert_decreasing
from ...core.method import BlockArgs, DynamicMethod, register
from .calibration import WidthRanking, ranking_for
from .settings import PARTS, WidthSettings, ramp, kept_count

if TYPE_CHECKING:
    from ...core.executor import CallState, ModelCall, RunContext

logger = logging.getLogger("dynamic_dit")


# --- the runtime ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WidthDecision:
    """Kept heads and groups of every block (None: all) for one sigma."""

    heads: tuple[tuple[int, ...] | None, ...]
    groups: tuple[tuple[int, ...] | None, ...]
    text: str

    @property
    def full(self) -> bool:
        return all(h is None for h in self.heads) and all(g is None for g in self.groups)


@register
class DynamicWidth(DynamicMethod):
    settings_type = WidthSettings
    order = 30
    settings: WidthSettings

    def __init__(self, settings: WidthSettings, run: "RunContext") -> None:
        super().__init__(settings, run)
        adapter = run.adapter
        units = adapter.width_units()
        if units is None:  # settings are validated when applied, so only a changed model gets here
            raise UnsupportedModelError(f"Dynamic width does not support {adapter.display_name} models.")
        self.units = units
        self.thin_heads, self.thin_mlp = PARTS[settings.parts]
        self.head_count = units.head_count
        self.group_count = settings.group_count(adapter)
        self.blocks = adapter.blocks
        self.block_index = {block: i for i, block in enumerate(self.blocks)}
        self._decisions: dict[float, WidthDecision] = {}
        self._active: WidthDecision | None = None
        self._ranking: WidthRanking | None = None
        self._ramp: tuple[float, float] | None = None
        self._routes: dict[float, WidthDecision] | None = None  # the router's decision per sigma, this run
        self._router_rows: torch.Tensor | None = None
        if settings.router is not None:
            rows = {label: row for row, label in enumerate(settings.router.labels)}
            self._router_rows = torch.tensor([rows[block.label] for block in self.blocks])

    # --- hooks --------------------------------------------------------------------------------
    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        sigma = call.step.sigma
        decision, note = self._decisions.get(sigma), ""
        if decision is None:
            if not self._decisions:  # the first call decides every step of the schedule, so later steps build nothing
                note = self._decide_schedule(call, model_call)
            if sigma not in self._decisions:  # a sigma off the schedule (e.g. a midpoint evaluation)
                self._decisions[sigma], extra = self._decide(call, model_call, sigma, call.step.percent)
                note += extra
                self._prepare([self._decisions[sigma]])
            decision = self._decisions[sigma]
        call.record.methods[self.name] = decision.text + note
        self._active = decision
        try:
            return proceed(model_call)
        finally:
            self._active = None

    def block_internals(self, call: "CallState", block: BlockRef, args: BlockArgs, internals: BlockInternals) -> BlockInternals:
        decision = self._active
        if decision is None or decision.full:
            return internals
        i = self.block_index[block]
        heads, groups = decision.heads[i], decision.groups[i]
        if self.thin_heads:
            call.record.note_block(block.label, "heads", (self.head_count if heads is None else len(heads)) / self.head_count)
        if self.thin_mlp:
            call.record.note_block(block.label, "mlp", (self.group_count if groups is None else len(groups)) / self.group_count)
        changes: dict[str, Any] = {}
        if heads is not None:
            changes["heads"] = heads
        if groups is not None:
            changes.update(mlp_groups=groups, mlp_group_count=self.group_count)
        return internals.with_changes(**changes) if changes else internals

    def finish(self) -> None:
        self._decisions.clear()
        self._active = None
        self._routes = None

    # --- decisions ----------------------------------------------------------------------------
    def _decide_schedule(self, call: "CallState", model_call: "ModelCall") -> str:
        """Decide every sigma of the run's schedule now and build what their reduced blocks need, with all
        index tensors in one copy to the device. Returns the notes of one-off work (calibration)."""
        steps, notes = self.run.steps, []
        for sigma in dict.fromkeys([call.step.sigma, *steps.sigmas[:-1]]):
            percent = call.step.percent if sigma == call.step.sigma else steps.percent_of(sigma)
            self._decisions[sigma], note = self._decide(call, model_call, sigma, percent)
            notes.append(note)
        self._prepare(self._decisions.values())
        return "".join(notes)

    def _prepare(self, decisions) -> None:
        internals = [
            self._internals(decision, i) for decision in decisions if not decision.full for i in range(len(self.blocks))
        ]
        self.run.adapter.prepare_reductions(internals, self.run.indices, self.run.device)

    def _internals(self, decision: WidthDecision, i: int) -> BlockInternals:
        changes: dict[str, Any] = {}
        if decision.heads[i] is not None:
            changes["heads"] = decision.heads[i]
        if decision.groups[i] is not None:
            changes.update(mlp_groups=decision.groups[i], mlp_group_count=self.group_count)
        return BlockInternals(**changes)

    def _decide(self, call: "CallState", model_call: "ModelCall", sigma: float, percent: float) -> tuple[WidthDecision, str]:
        settings = self.settings
        none = (None,) * len(self.blocks)
        if not settings.in_window(percent):
            return WidthDecision(none, none, "full width (outside the window)"), ""
        if settings.router is not None:
            return self._route(call, model_call, sigma), ""
        note = ""
        if self._ramp is None:
            self._ramp, note = self._solve_ramp(call)
        fraction = ramp(*self._ramp, settings, percent)
        head_k = kept_count(fraction, self.head_count) if self.thin_heads else self.head_count
        group_k = kept_count(fraction, self.group_count) if self.thin_mlp else self.group_count
        if head_k == self.head_count and group_k == self.group_count:
            return WidthDecision(none, none, "full width"), note
        if self._ranking is None:
            latent = self.run.adapter.latent(model_call.arguments)
            self._ranking, fresh = ranking_for(self.run, call.diffusion_model, latent, settings.calibration, self.group_count)
            if fresh:
                # one-off work, shown apart from the steps (its time is inside this call's, taken out of step 0)
                self.run.record.note_setup("width calibration", self._ranking.seconds, self._ranking.flops, inside=call.record)
                note += f"; calibrated {len(self._ranking.percents)} points in {self._ranking.seconds:.2f} s"
                logger.info(
                    "Dynamic width: calibrated the head/MLP-group ranking in %.2f s (%d points, cached for these weights)",
                    self._ranking.seconds, len(self._ranking.percents),
                )
        point = self._ranking.point(percent)
        heads = tuple(_top(order, head_k) for order in self._ranking.heads[point])
        groups = tuple(_top(order, group_k) for order in self._ranking.groups[point])
        return WidthDecision(heads, groups, self._describe(heads, groups)), note

    def _route(self, call: "CallState", model_call: "ModelCall", sigma: float) -> WidthDecision:
        """The router's decision at `sigma`. The first call evaluates the router for every sigma of the
        run's schedule at once (one read from the device per run, not one per step)."""
        if self._routes is None or sigma not in self._routes:
            sigmas = [sigma] if self._routes is not None else sorted({*self.run.steps.sigmas[:-1], sigma}, reverse=True)
            self._routes = {**(self._routes or {}), **self._route_all(call, model_call, sigmas)}
        return self._routes[sigma]

    def _route_all(self, call: "CallState", model_call: "ModelCall", sigmas: list[float]) -> dict[float, WidthDecision]:
        router, like = self.settings.router, self.run.adapter.latent(model_call.arguments)
        sampling = self.run.model_sampling
        values = torch.tensor(sigmas, dtype=torch.float32).to(like.device)
        timesteps = sampling.timestep(values).float() if sampling is not None else values
        features = self.units.timestep_features(call.diffusion_model, timesteps, like.dtype).float()
        rows = self._router_rows.to(features.device)
        head_w, head_b, group_w, group_b = (
            t.to(features.device)[rows] for t in (router.head_weight, router.head_bias, router.group_weight, router.group_bias)
        )
        call.add_executed(FlopBreakdown(extra=router.flops * len(sigmas)))
        head_logits = (torch.einsum("bhf,sf->sbh", head_w, features) + head_b).cpu()  # (sigmas, blocks, heads)
        group_logits = (torch.einsum("bgf,sf->sbg", group_w, features) + group_b).cpu()
        routes = {}
        for i, value in enumerate(sigmas):
            heads = tuple(_positive(row) for row in head_logits[i]) if self.thin_heads else (None,) * len(self.blocks)
            groups = tuple(_positive(row) for row in group_logits[i]) if self.thin_mlp else (None,) * len(self.blocks)
            routes[value] = WidthDecision(heads, groups, self._describe(heads, groups))
        return routes

    def _describe(self, heads: tuple, groups: tuple) -> str:
        def mean(kept: tuple, units: int) -> float:
            return sum(units if k is None else len(k) for k in kept) / (units * len(kept))

        if all(k is None for k in heads + groups):
            return "full width"
        parts = []
        if self.thin_heads:
            parts.append(f"heads {mean(heads, self.head_count):.2f}")
        if self.thin_mlp:
            parts.append(f"mlp {mean(groups, self.group_count):.2f}")
        return ", ".join(parts)

    # --- target FLOPs ---------------------------------------------------------------------------
    def _solve_ramp(self, call: "CallState") -> tuple[tuple[float, float], str]:
        """The fixed ramp, or the ramp whose average FLOPs ratio over this run's steps meets the target.

        Candidate ramps lie on one path, ordered by FLOPs: first the noisy end drops from full width
        to the minimum (clean end at full width), then the clean end drops too.
        """
        settings = self.settings
        if settings.target_flops is None:
            return (settings.noisy_width, settings.clean_width), ""
        percents = self._step_percents(call)
        ratio_of = _FlopsRatio(self.run.adapter, call.shape, self.head_count, self.group_count, self.thin_heads, self.thin_mlp)

        def path(u: float) -> tuple[float, float]:
            return 1.0 - min(u, 1.0), 1.0 - max(u - 1.0, 0.0)

        def average(u: float) -> float:
            noisy, clean = path(u)
            return sum(ratio_of(ramp(noisy, clean, settings, p)) for p in percents) / len(percents)

        target = settings.target_flops
        lowest = average(2.0)
        if lowest > target:
            return path(2.0), f"; target FLOPs {target:.2f} is out of reach here, lowest {lowest:.2f}"
        lo, hi = 0.0, 2.0
        for _ in range(40):
            mid = (lo + hi) / 2
            if average(mid) <= target:
                hi = mid
            else:
                lo = mid
        noisy, clean = path(hi)
        return (noisy, clean), f"; target FLOPs {target:.2f}: ramp {noisy:.2f}->{clean:.2f}, {average(hi):.2f} of full"

    def _step_percents(self, call: "CallState") -> list[float]:
        sigmas = self.run.steps.sigmas[:-1]
        to_sigma = self.run.percent_to_sigma
        if not sigmas or to_sigma is None:
            return [call.step.percent]
        return [invert_decreasing(to_sigma, s) for s in sigmas]


class _FlopsRatio:
    """FLOPs of a call of `shape` at a width fraction, over the full model's (analytic, memoised)."""

    def __init__(self, adapter: ModelAdapter, shape: CallLayout, heads: int, groups: int, thin_heads: bool, thin_mlp: bool):
        self.adapter, self.shape = adapter, shape
        self.heads, self.groups, self.thin_heads, self.thin_mlp = heads, groups, thin_heads, thin_mlp
        self.full = adapter.full_flops(shape).total
        self._memo: dict[tuple[int, int], float] = {}

    def __call__(self, fraction: float) -> float:
        head_k = kept_count(fraction, self.heads) if self.thin_heads else self.heads
        group_k = kept_count(fraction, self.groups) if self.thin_mlp else self.groups
        key = (head_k, group_k)
        if key not in self._memo:
            internals = BlockInternals(
                heads=tuple(range(head_k)), mlp_groups=tuple(range(group_k)), mlp_group_count=self.groups
            )
            total = self.adapter.stem_flops(self.shape).total
            for block in self.adapter.blocks:
                work = self.adapter.reduced_work(block, self.adapter.full_block_work(block, self.shape), internals)
                total += self.adapter.block_flops(block, work).total
            self._memo[key] = total / self.full
        return self._memo[key]


def _top(order: tuple[int, ...], k: int) -> tuple[int, ...] | None:
    return None if k >= len(order) else tuple(sorted(order[:k]))


def _positive(logits: torch.Tensor) -> tuple[int, ...] | None:
    """Units with a positive logit (None: all); the largest logit when none is positive."""
    kept = torch.nonzero(logits > 0).reshape(-1).tolist()
    if len(kept) == logits.numel():
        return None
    return tuple(kept) if kept else (int(torch.argmax(logits)),)


__all__ = ["DynamicWidth", "WidthDecision"]
