"""The training-free ranking of dynamic width: every block's heads and MLP groups ordered by their
measured share of the block's output, from a short deterministic calibration run of the full model
(the family's `WidthUnits` measures), cached per model and weights."""
from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...families import BlockRef, CallLayout, ModelAdapter, WidthUnits

if TYPE_CHECKING:
    from ...core.executor import RunContext


@dataclass(frozen=True)
class CalibrationSpec:
    """The deterministic synthetic input of the training-free ranking (see `calibrate`)."""

    percents: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)  # sampling progress of the measured points
    latent_size: tuple[int, int] = (32, 32)  # latent height, width (Flux: 16x16 = 256 image tokens)
    text_tokens: int = 16
    guidance: float = 3.5  # guidance embedding value for guidance-distilled models (Flux dev's default)
    seed: int = 0



@dataclass(frozen=True)
class WidthRanking:
    """Per calibration point and block: heads and MLP groups, largest measured contribution first."""

    percents: tuple[float, ...]
    heads: tuple[tuple[tuple[int, ...], ...], ...]  # [point][block] -> head indices
    groups: tuple[tuple[tuple[int, ...], ...], ...]
    seconds: float
    flops: float

    def point(self, percent: float) -> int:
        """The calibration point nearest to `percent` (ties go to the noisier one)."""
        return min(range(len(self.percents)), key=lambda i: (abs(self.percents[i] - percent), i))


def _order(scores: torch.Tensor) -> tuple[int, ...]:
    values = scores.tolist()
    return tuple(sorted(range(len(values)), key=lambda u: (-values[u], u)))


class _Probes(dict):
    """`patches_replace["dit"]` entries that measure every block's units while running it."""

    def __init__(self, run: "RunContext", units: WidthUnits, diffusion_model: torch.nn.Module, groups: int):
        super().__init__()
        self.blocks = run.adapter.blocks
        self.scores: dict[BlockRef, tuple[torch.Tensor, torch.Tensor]] = {}
        adapter = run.adapter
        for block in self.blocks:
            module = adapter.block_module(diffusion_model, block)

            def probe(args: dict, extra: dict, block: BlockRef = block, module: torch.nn.Module = module) -> dict:
                out, heads, groups_ = units.measure_units(module, block, args, groups, run.weight_source)
                self.scores[block] = (heads, groups_)
                return out

            self[adapter.patch_key(block)] = probe

    def orders(self, part: int) -> tuple[tuple[int, ...], ...]:
        """Per block (in execution order): units by measured share, largest first (ties: lower index)."""
        missing = [b.label for b in self.blocks if b not in self.scores]
        if missing:
            raise RuntimeError(f"Dynamic width: calibration did not reach blocks {', '.join(missing)}.")
        scores = torch.stack([self.scores[block][part] for block in self.blocks]).cpu()  # one read for all blocks
        return tuple(_order(row) for row in scores)


def calibrate(
    run: "RunContext", diffusion_model: torch.nn.Module, like: torch.Tensor, spec: CalibrationSpec, groups: int
) -> WidthRanking:
    """Rank every block's heads and MLP groups by their share of the block's output.

    The input depends on nothing but the model and `spec`: seeded noise (a CPU generator, so the
    device does not matter) sampled with the full model and neutral conditioning (empty text, as
    ConditioningZeroOut gives) by Euler steps through the sigmas of `spec.percents`, measured at each
    of them. The same weights therefore always give the same ranking, whatever ran before.
    """
    adapter, sampling = run.adapter, run.model_sampling
    units = adapter.width_units()
    if sampling is None or run.percent_to_sigma is None:
        raise RuntimeError("Dynamic width: calibration needs the host's model sampling; the run did not provide it.")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(spec.seed)
    height, width = spec.latent_size
    noise = units.calibration_latent(height, width, generator).to(like.device)
    sigmas = [float(run.percent_to_sigma(p)) for p in spec.percents]
    x = sampling.noise_scaling(_sigma(sigmas[0], noise), noise, torch.zeros_like(noise))
    head_orders, group_orders, flops = [], [], 0.0
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            s = _sigma(sigma, noise)
            probes = _Probes(run, units, diffusion_model, groups)
            arguments = units.neutral_arguments(
                sampling.calculate_input(s, x).to(like.dtype), sampling.timestep(s).float(), spec.text_tokens, spec.guidance
            )
            out = diffusion_model(**arguments, transformer_options={"patches_replace": {"dit": probes}}).float()
            head_orders.append(probes.orders(0))
            group_orders.append(probes.orders(1))
            flops += _calibration_flops(adapter, adapter.call_layout(arguments))
            if i + 1 < len(sigmas):  # an Euler step to the next point
                denoised = sampling.calculate_denoised(s, out, x)
                x = denoised + (x - denoised) * (sigmas[i + 1] / sigma)
    if like.device.type == "cuda":
        torch.cuda.synchronize(like.device)
    return WidthRanking(
        percents=tuple(spec.percents),
        heads=tuple(head_orders),
        groups=tuple(group_orders),
        seconds=time.perf_counter() - started,
        flops=flops,
    )


def _sigma(value: float, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) sigma, broadcasting over a latent of any rank (image or video)."""
    return torch.full((like.shape[0],), value, dtype=torch.float32, device=like.device)


def _calibration_flops(adapter: ModelAdapter, shape: CallLayout) -> float:
    """A full forward, plus the probes: every block's output linears once more, one unit at a time."""
    total = adapter.full_flops(shape).total
    for block in adapter.blocks:
        part = adapter.block_flops(block, adapter.full_block_work(block, shape))
        total += part.proj + part.mlp / 2  # the MLP's output half (D x M, like its input half)
    return total


class _RankingCache:
    """Rankings per diffusion-model module (weakly held) and weight identity; small LRU per module."""

    def __init__(self, per_model: int = 8):
        self._lock = threading.Lock()
        self._models: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
        self._per_model = per_model

    def get(self, model: torch.nn.Module, key: Any) -> WidthRanking | None:
        with self._lock:
            entries = self._models.get(model)
            if entries is None or key not in entries:
                return None
            entries.move_to_end(key)
            return entries[key]

    def put(self, model: torch.nn.Module, key: Any, ranking: WidthRanking) -> None:
        with self._lock:
            entries = self._models.setdefault(model, OrderedDict())
            entries[key] = ranking
            while len(entries) > self._per_model:
                entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._models.clear()


RANKINGS = _RankingCache()


def ranking_for(
    run: "RunContext", diffusion_model: torch.nn.Module, like: torch.Tensor, spec: CalibrationSpec, groups: int
) -> tuple[WidthRanking, bool]:
    """The cached ranking of these weights, or a fresh calibration (then True)."""
    key = None
    if run.weights_key is not None:
        modules = tuple(id(run.adapter.block_module(diffusion_model, b)) for b in run.adapter.blocks)
        key = (run.weights_key, modules, spec, groups, like.dtype, str(like.device))
        cached = RANKINGS.get(diffusion_model, key)
        if cached is not None:
            return cached, False
    ranking = calibrate(run, diffusion_model, like, spec, groups)
    if key is not None:
        RANKINGS.put(diffusion_model, key, ranking)
    return ranking, True


__all__ = ["RANKINGS", "CalibrationSpec", "WidthRanking", "calibrate", "ranking_for"]
