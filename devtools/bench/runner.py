"""Running the cases: the workload every case samples, the interleaved repeats, the results."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .cases import Case, _off
from ...core.fidelity import psnr, ssim

# --- workloads -----------------------------------------------------------------------------------
@dataclass
class Job:
    label: str
    positive: list
    negative: list
    seed: int


@dataclass
class Workload:
    """What every case samples: the unpatched model, the jobs, the sampler settings, how to get images."""

    model: Any
    jobs: list[Job]
    sample: dict  # keyword arguments of tiny_flux.sample: height, width (latent), steps, sampler, scheduler, cfg
    to_image: Callable  # final latent -> (B, 3, H, W) RGB in [0, 1]
    title: str
    settings: str  # one line: model, size, steps, sampler, cfg, jobs
    fidelity: str  # how the compared images are made
    meaningful_fidelity: bool = True


@dataclass
class Result:
    case: str
    family: str
    flops_ratio: float | None = None  # executed / full (None: no executor, the unpatched model)
    seconds: list[float] = field(default_factory=list)  # model time per repeat (telemetry)
    wall: list[float] = field(default_factory=list)  # wall time of the sampling calls per repeat
    psnr: float = math.inf
    ssim: float = 1.0
    identical: bool = True  # every final latent bit-identical to full compute
    note: str = ""
    images: Any = None  # final images of the first repeat, (jobs, 3, H, W)

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else math.nan

    @property
    def fastest_seconds(self) -> float:
        """The fastest repeat's model time: on a shared machine other jobs only ever add time."""
        return min(self.seconds) if self.seconds else math.nan

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def flops_reduction(self) -> float:
        if self.flops_ratio is None:
            return math.nan
        return 1 / self.flops_ratio if self.flops_ratio > 0 else math.inf


@dataclass
class Report:
    workload: Workload
    unpatched: Result
    results: list[Result]  # the full-compute baseline first
    repeats: int
    seconds: float

    @property
    def baseline(self) -> Result:
        return self.results[0]

    def speedup(self, result: Result) -> float:
        return self.baseline.median_seconds / result.median_seconds if result.median_seconds > 0 else math.inf

    def fastest_speedup(self, result: Result) -> float:
        """The same from the fastest repeat of each (the steadier estimate on a shared machine)."""
        return self.baseline.fastest_seconds / result.fastest_seconds if result.fastest_seconds > 0 else math.inf

    @property
    def off_overhead(self) -> float:
        """Wall time of the sampling call with every method off, relative to the unpatched model (0.01 = 1 %)."""
        return self.baseline.median_wall / self.unpatched.median_wall - 1

    @property
    def fastest_off_overhead(self) -> float:
        """The same from the fastest repeat of each: on a shared machine noise only ever adds time, so the
        minimum is the steadier estimate of a small overhead."""
        return min(self.baseline.wall) / min(self.unpatched.wall) - 1


def run_cases(workload: Workload, cases: list[Case], repeats: int, log: Callable[[str], None] = print,
              warm_up: bool = True) -> Report:
    """Sample every case `repeats` times (interleaved) and measure speed and fidelity against full compute."""
    import torch

    from ...integration.patching import plan_of
    from ...demo.tiny_flux import sample as sample_model

    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    baseline = Case("full compute (every method off)", _off, family="full")
    unpatched = Case("unpatched model (no executor)", lambda model: model, family="unpatched")
    entries = [baseline, unpatched, *cases]  # the baseline first: the others compare against its latents
    models = {case.name: case.build(workload.model) for case in entries}
    results = {case.name: Result(case.name, case.family, note=case.note) for case in entries}
    started = time.perf_counter()
    with torch.no_grad():
        for case in entries if warm_up else ():  # allocations, kernels, lazy loads: not measured
            job = workload.jobs[0]
            sample_model(models[case.name], job.positive, job.negative, seed=job.seed, **{**workload.sample, "steps": 1})
        reference_latents: list = []
        baseline_flops = 0.0
        for repeat in range(repeats):
            for case in entries:
                model, result = models[case.name], results[case.name]
                plan = plan_of(model)
                wall = seconds = executed = full = 0.0
                latents = []
                for job in workload.jobs:
                    begin = time.perf_counter()
                    latent = sample_model(model, job.positive, job.negative, seed=job.seed, **workload.sample)
                    wall += time.perf_counter() - begin
                    latents.append(latent)
                    if plan is not None:
                        run = plan.telemetry.latest()
                        seconds, executed, full = seconds + run.model_seconds, executed + run.executed_flops, full + run.full_flops
                result.wall.append(wall)
                if plan is not None:
                    result.seconds.append(seconds)
                    # Against the baseline's FLOPs, not the run's own "full" count: a foreign cache that skips
                    # a whole model call outside the executor (LazyCache) leaves no record of it at all.
                    result.flops_ratio = executed / baseline_flops if baseline_flops > 0 else 1.0
                if case is baseline and repeat == 0:
                    reference_latents = latents
                    baseline_flops = full
                compare = repeat == 0 and case is not baseline or case is baseline and repeat == min(1, repeats - 1)
                if compare:  # the baseline against its own first repeat: run-to-run determinism
                    _fidelity(workload, result, reference_latents, latents)
            log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(
                f"{r.case} {r.seconds[-1] if r.seconds else r.wall[-1]:.3f}s" for r in results.values()))
    ordered = [results[case.name] for case in entries]
    return Report(workload, ordered[1], [ordered[0], *ordered[2:]], repeats, time.perf_counter() - started)


def _fidelity(workload: Workload, result: Result, reference_latents: list, latents: list) -> None:
    import torch

    result.identical = all(torch.equal(a, b) for a, b in zip(reference_latents, latents))
    reference = torch.cat([workload.to_image(latent) for latent in reference_latents])
    images = torch.cat([workload.to_image(latent) for latent in latents])
    result.psnr = psnr(reference, images)
    result.ssim = ssim(reference, images) if min(images.shape[-2:]) >= 11 else math.nan
    result.images = images
