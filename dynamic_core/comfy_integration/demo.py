"""The main job on an embedded default: a tiny real Flux in a real ComfyUI host, sampled with the same
seed through a full-compute baseline and through the pack's nodes; prints the per-step speedup table
and writes the chart image.

    python -m dynamic_core.comfy_integration.demo [--steps 8] [--size 512] [--out out/]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from . import host


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    host.prepare(cpu=True)
    pack = host.load_pack()
    import torch

    from comfyui_dynamic_dit.dynamic_core.comfy_integration import tiny_flux

    nodes = pack.NODE_CLASS_MAPPINGS
    config = tiny_flux.TinyFlux(hidden_size=args.hidden, num_heads=args.heads)
    model = tiny_flux.build_model(config)
    positive, negative = tiny_flux.conditioning(config)
    sample = dict(height=args.size // 8, width=args.size // 8, steps=args.steps, sampler=args.sampler, cfg=1.0, seed=args.seed)
    print(f"Dynamic DiT demo - {tiny_flux.describe(config)}")
    print(f"host: ComfyUI at {host.find_comfyui()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"sampling: {args.size}x{args.size} px, {args.steps} steps, {args.sampler}, seed {args.seed}\n")

    (baseline,) = nodes["DynamicTelemetry"]().patch(model)
    (dynamic,) = nodes["DynamicTelemetry"]().patch(model)  # the method nodes chain here as they land

    tiny_flux.sample(baseline, positive, negative, **{**sample, "steps": 1})  # warm-up, not reported
    started = time.perf_counter()
    base_latent = {"samples": tiny_flux.sample(baseline, positive, negative, **sample)}
    dyn_latent = {"samples": tiny_flux.sample(dynamic, positive, negative, **sample)}
    wall = time.perf_counter() - started

    report = nodes["DynamicSpeedReport"]().report(dynamic, dyn_latent, baseline_model=baseline, baseline_latent=base_latent)
    print(report["result"][1])
    difference = (base_latent["samples"] - dyn_latent["samples"]).abs().max().item()
    print(f"\nmax |dynamic - full| over the final latent: {difference:.3g}   (both runs: {wall:.1f} s wall)")

    args.out.mkdir(parents=True, exist_ok=True)
    chart_path = args.out / "demo_chart.png"
    chart = report["result"][2][0].mul(255).round().byte().numpy()
    from PIL import Image

    Image.fromarray(chart).save(chart_path)
    print(f"chart: {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
