"""Side-by-side speed (and latent fidelity) of dynamic settings against full compute, in one process.

    python -m dynamic_core.comfy_integration.bench --hidden 768 --heads 12 --size 512 --steps 6 \
        --repeats 5 --cases off,easycache:0.2

Every case is sampled with the same seed, conditioning and sampler; runs of all cases interleave
(repeat 1 of every case, then repeat 2, ...) so machine noise spreads evenly, and the model time of a
case is the median over repeats of the summed diffusion-model call times the executor's telemetry
measured (synchronised on CUDA). The full-compute baseline runs through the same executor with every
method off. Methods register their cases in CASE_BUILDERS.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import host


@dataclass
class Case:
    name: str
    build: Callable[[Any], Any]  # model patcher -> patched model carrying the executor


@dataclass
class Result:
    case: str
    flops_ratio: float  # executed / full
    seconds: list[float] = field(default_factory=list)
    psnr: float = math.inf  # final latent against full compute

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds)


def _off(model):
    from .patching import install_executor

    return install_executor(model)


def _easycache(threshold: float) -> Callable[[Any], Any]:
    def build(model):
        from comfy_extras.nodes_easycache import EasyCacheNode

        from .patching import install_executor

        return install_executor(EasyCacheNode.execute(model, threshold, 0.15, 0.95, False).result[0])

    return build


def _td_lora(arg: str | None) -> Case:
    """A random TD-LoRA on every block linear: K experts (default 3) of rank r (default 16), e.g. 'tdlora:4/32'."""
    experts_text, _, rank_text = (arg or "3").partition("/")
    experts, rank = int(experts_text), int(rank_text or 16)

    def build(model):
        from ..methods.td_lora import architecture_metadata, block_linear_shapes, parse_td_lora, random_td_lora, td_lora_state_dict
        from .patching import adapter_of
        from .td_lora_files import apply_td_lora

        adapter = adapter_of(model)
        layers, gate = random_td_lora(block_linear_shapes(adapter, model.model.diffusion_model), experts, rank)
        tensors, metadata = td_lora_state_dict(layers, architecture_metadata(adapter), gate)
        return apply_td_lora(model, parse_td_lora(tensors, metadata, f"random-K{experts}-r{rank}"), 1.0)

    return Case(f"TD-LoRA K={experts} rank {rank}", build)


def _token_router(mode: str, keep: float) -> Callable[[Any], Any]:
    def build(model):
        from ..methods.token_router import TokenRouterSettings
        from .patching import apply_settings

        return apply_settings(
            model, TokenRouterSettings(mode=mode, keep_start=keep, keep_end=keep, first_full=0, last_full=0, score="update")
        )

    return build


def _width(fraction: float) -> Callable[[Any], Any]:
    """Constant width (heads and MLP) over the whole schedule, training-free ranking."""

    def build(model):
        from ..methods.width import WidthSettings
        from .patching import apply_settings

        return apply_settings(model, WidthSettings(noisy_width=fraction, clean_width=fraction))

    return build


def _token_router_case(mode: str) -> Callable[[str | None], Case]:
    return lambda arg: Case(
        f"Token Router {mode} keep {arg or '0.5'} (every block, update-magnitude score)", _token_router(mode, float(arg or 0.5))
    )


def _patch_scheduler(**settings: Any) -> Callable[[Any], Any]:
    def build(model):
        from ..methods.patch_scheduler import PatchSchedulerSettings
        from .patching import apply_settings

        return apply_settings(model, PatchSchedulerSettings(**settings))

    return build


def _ddit_manual(arg: str | None) -> Case:
    """`ddit:0-40%:4;40-70%:2` (ranges separated by ';', since ',' separates cases)."""
    from ..methods.patch_scheduler import parse_schedule

    schedule = parse_schedule(arg or "0-40%:4;40-70%:2;70-100%:1")
    return Case(f"DDiT manual {', '.join(r.describe() for r in schedule)}", _patch_scheduler(mode="manual", schedule=schedule))


def _ddit_auto(arg: str | None) -> Case:
    """`ddit-auto:<tau>` with the node's other defaults."""
    tau = float(arg or 0.001)
    return Case(f"DDiT auto τ {tau:g}", _patch_scheduler(mode="auto", tau=tau))


# name -> builder(argument string or None) -> Case; methods add theirs as they land
CASE_BUILDERS: dict[str, Callable[[str | None], Case]] = {
    "off": lambda arg: Case("every method off", _off),
    "easycache": lambda arg: Case(f"EasyCache {arg or '0.2'}", _easycache(float(arg or 0.2))),
    "tdlora": _td_lora,
    "diffcr": _token_router_case("diffcr"),
    "sdt": _token_router_case("sdt"),
    "reuse": _token_router_case("reuse"),
    "width": lambda arg: Case(f"width {arg or '0.5'}", _width(float(arg or 0.5))),
    "ddit": _ddit_manual,
    "ddit-auto": _ddit_auto,
}


def parse_cases(spec: str) -> list[Case]:
    cases = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, arg = item.partition(":")
        if name not in CASE_BUILDERS:
            raise SystemExit(f"unknown case '{name}'; known: {', '.join(CASE_BUILDERS)}")
        cases.append(CASE_BUILDERS[name](arg or None))
    return cases


def psnr(reference, other) -> float:
    """PSNR over the reference's value range (latents are not bounded images)."""
    mse = float(((reference - other) ** 2).mean())
    if mse == 0:
        return math.inf
    peak = float(reference.max() - reference.min())
    return 10 * math.log10(peak**2 / mse)


def run_cases(model, positive, negative, cases: list[Case], sample: dict, repeats: int, log=print) -> list[Result]:
    from .patching import plan_of
    from .tiny_flux import sample as sample_model

    baseline = Case("full compute", _off)
    patched = {case.name: case.build(model) for case in [baseline, *cases]}
    for warm in patched.values():  # warm-up; one-off work (e.g. a width calibration) is not measured
        sample_model(warm, positive, negative, **{**sample, "steps": 1})
    results: dict[str, Result] = {}
    reference = None
    for repeat in range(repeats):
        for case in [baseline, *cases]:
            latent = sample_model(patched[case.name], positive, negative, **sample)
            run = plan_of(patched[case.name]).telemetry.latest()
            result = results.setdefault(case.name, Result(case.name, run.executed_flops / run.full_flops))
            result.seconds.append(run.model_seconds)
            if case is baseline and reference is None:
                reference = latent
            elif case is not baseline and repeat == 0:
                result.psnr = psnr(reference, latent)
        log(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{name} {r.seconds[-1]:.3f}s" for name, r in results.items()))
    return list(results.values())


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}"
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def markdown(results: list[Result], title: str, settings: str) -> str:
    baseline = results[0]
    lines = [
        f"### {title}",
        "",
        f"{datetime.date.today().isoformat()} - {machine()}",
        f"{settings}",
        "",
        "| setting | FLOPs vs full | FLOPs reduction | model time (median) | speedup | speedup / FLOPs reduction | latent PSNR vs full |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        reduction = 1 / r.flops_ratio if r.flops_ratio > 0 else math.inf
        speedup = baseline.median_seconds / r.median_seconds if r.median_seconds > 0 else math.inf
        efficiency = speedup / reduction if math.isfinite(reduction) and reduction > 0 else math.nan
        lines.append(
            f"| {r.case} | {r.flops_ratio:.1%} | x{reduction:.2f} | {r.median_seconds * 1e3:.0f} ms | x{speedup:.2f} "
            f"| {efficiency:.2f} | {'inf' if math.isinf(r.psnr) else f'{r.psnr:.1f} dB'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="off")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--title", default="Speed side by side")
    args = parser.parse_args(argv)

    host.prepare(cpu=True)
    host.load_pack()
    import torch

    from comfyui_dynamic_dit.dynamic_core.comfy_integration import bench as pack_bench
    from comfyui_dynamic_dit.dynamic_core.comfy_integration import tiny_flux

    if args.threads:
        torch.set_num_threads(args.threads)
    config = tiny_flux.TinyFlux(hidden_size=args.hidden, num_heads=args.heads, depth=args.depth, depth_single_blocks=args.single)
    model = tiny_flux.build_model(config)
    positive, negative = tiny_flux.conditioning(config)
    sample = dict(height=args.size // 8, width=args.size // 8, steps=args.steps, sampler=args.sampler, cfg=1.0, seed=0)
    cases = pack_bench.parse_cases(args.cases)
    started = time.perf_counter()
    with torch.no_grad():
        results = pack_bench.run_cases(model, positive, negative, cases, sample, args.repeats)
    tokens = (args.size // 16) ** 2
    settings = (
        f"Flux-architecture model, random weights: hidden {args.hidden}, {args.heads} heads, {args.depth} double + "
        f"{args.single} single blocks; {args.size}x{args.size} px ({tokens} image tokens), {args.steps} steps {args.sampler}, "
        f"cfg 1, batch 1; median of {args.repeats} interleaved runs ({time.perf_counter() - started:.0f} s in all)"
    )
    print(pack_bench.markdown(results, args.title, settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
