"""The main job on an embedded default: a tiny real Flux in a real ComfyUI host, sampled with the same
seed through a full-compute baseline and through the pack's nodes; prints the per-step speedup table
and writes the chart image.

    python -m devtools.demo [--steps 8] [--size 512] [--out out/]
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

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


# The nodes the demo chains between the loaded model and the sampler, with the settings that differ
# from the nodes' defaults (training-free: the demo model has no trained routers or embeddings).
DEMO_CHAIN: tuple[tuple[str, dict[str, Any]], ...] = (
    ("DynamicPatchScheduler", {"mode": "manual", "manual_schedule": "0-25%:2"}),
    ("DynamicWidthPatcher", {"preset": "fast (trades more quality)"}),
    ("DynamicTokenRouter", {"mode": "reuse"}),
)


def run_node(node_class: type, **inputs: Any) -> Any:
    """Call a node as ComfyUI would, with its declared defaults for every widget not given; its first output."""
    from ..integration.patching import node_output
    from .workflows import widget_defaults

    return node_output(getattr(node_class(), node_class.FUNCTION)(**{**widget_defaults(node_class), **inputs}))


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    host.prepare(cpu=True)
    host.load_pack()
    from comfyui_dynamic_dit.devtools import demo as pack_demo  # the pack's own copy, relative imports and all

    return pack_demo.run(args)


def run(args: argparse.Namespace) -> int:
    import torch

    pack = host.load_pack()

    from comfyui_dynamic_dit.demo import tiny_flux
    from comfyui_dynamic_dit.demo import reference as reference_model

    nodes = pack.NODE_CLASS_MAPPINGS
    config = tiny_flux.TinyFlux(hidden_size=args.hidden, num_heads=args.heads)
    model = reference_model.build_model(config)
    positive, negative = tiny_flux.conditioning(config)
    sample = dict(height=args.size // 8, width=args.size // 8, steps=args.steps, sampler=args.sampler, cfg=1.0, seed=args.seed)
    print(f"Dynamic DiT demo - {tiny_flux.describe(config)}")
    print(f"host: ComfyUI at {host.find_comfyui()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"sampling: {args.size}x{args.size} px, {args.steps} steps, {args.sampler}, seed {args.seed}")
    print("chain: " + " -> ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in settings.items())})" for name, settings in DEMO_CHAIN) + "\n")

    (baseline,) = nodes["DynamicTelemetry"].execute(model).result
    dynamic = model
    for name, settings in DEMO_CHAIN:  # chained as an artist would, each node on the previous one's output
        dynamic = run_node(nodes[name], model=dynamic, **settings)

    for warm in (baseline, dynamic):  # warm-up, not reported: allocations and the width ranking's one-off calibration
        tiny_flux.sample(warm, positive, negative, **{**sample, "steps": 1})
    started = time.perf_counter()
    base_latent = {"samples": tiny_flux.sample(baseline, positive, negative, **sample)}
    dyn_latent = {"samples": tiny_flux.sample(dynamic, positive, negative, **sample)}
    wall = time.perf_counter() - started

    report = nodes["DynamicSpeedReport"].execute(dynamic, dyn_latent, baseline_model=baseline, baseline_latent=base_latent)
    print(report.result[1])
    difference = (base_latent["samples"] - dyn_latent["samples"]).abs().max().item()
    print(f"\nmax |dynamic - full| over the final latent: {difference:.3g}   (both runs: {wall:.1f} s wall)")

    args.out.mkdir(parents=True, exist_ok=True)
    chart_path = args.out / "demo_chart.png"
    chart = report.result[2][0].mul(255).round().byte().numpy()
    from PIL import Image

    Image.fromarray(chart).save(chart_path)
    print(f"chart: {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
