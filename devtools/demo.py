"""The main job on the shipped reference model (a small Flux of ComfyUI's own class, trained on photographs) in a
real ComfyUI host: the same seed sampled at full compute and through the pack's nodes at their defaults, as try_it
samples it; prints the per-step speedup table and the image's PSNR and SSIM against full compute, and writes the chart.

    python -m devtools.demo [--steps 16] [--photo-class coffee] [--out out/]
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
    parser.add_argument("--steps", type=int, default=16, help="sampling steps (try_it's: 16)")
    parser.add_argument("--photo-class", default="coffee", help="the reference model's photo class to sample")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=Path("out"))
    return parser.parse_args(argv)


# The nodes the demo chains between the loaded model and the sampler, at their defaults (training-free), as try_it does.
DEMO_CHAIN: tuple[tuple[str, dict[str, Any]], ...] = (
    ("DynamicPatchScheduler", {}),
    ("DynamicWidthPatcher", {}),
    ("DynamicTokenRouter", {}),
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

    from comfyui_dynamic_dit.demo import reference as reference_model, tiny_flux

    nodes = pack.NODE_CLASS_MAPPINGS
    reference = reference_model.load_reference()
    positive, negative = reference.conditioning(args.photo_class), reference.null_conditioning()
    side = reference.image_size // 2  # the latent is the photo 2x2-pixel-unshuffled
    sample = dict(height=side, width=side, steps=args.steps, sampler=args.sampler, cfg=args.cfg, seed=args.seed)
    print(f"Dynamic DiT demo - the reference model ({reference_model.REFERENCE_PATH.name}: Flux, hidden "
          f"{reference.config.hidden_size}, {reference.image_size} px photos), class '{args.photo_class}'")
    print(f"host: ComfyUI at {host.find_comfyui()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")
    print(f"sampling: {args.steps} steps, {args.sampler}, cfg {args.cfg:g}, seed {args.seed}")
    print("chain: " + " -> ".join(f"{name} (defaults)" for name, _ in DEMO_CHAIN) + "\n")

    (baseline,) = nodes["DynamicTelemetry"].execute(reference.model).result
    dynamic = reference.model
    for name, settings in DEMO_CHAIN:  # chained as an artist would, each node on the previous one's output
        dynamic = run_node(nodes[name], model=dynamic, **settings)

    for warm in (baseline, dynamic):  # warm-up, not reported: allocations and the width ranking's one-off calibration
        tiny_flux.sample(warm, positive, negative, **{**sample, "steps": 1})
    started = time.perf_counter()
    base_latent = {"samples": tiny_flux.sample(baseline, positive, negative, **sample)}
    dyn_latent = {"samples": tiny_flux.sample(dynamic, positive, negative, **sample)}
    wall = time.perf_counter() - started

    decode = nodes["DynamicReferenceLatentToImage"]
    images = [decode.execute(latent, 1).result[0] for latent in (dyn_latent, base_latent)]
    report = nodes["DynamicSpeedReport"].execute(dynamic, dyn_latent, baseline_model=baseline, baseline_latent=base_latent,
                                                 image=images[0], baseline_image=images[1])
    print(report.result[1])
    print(f"\n(both runs: {wall:.1f} s wall)")

    args.out.mkdir(parents=True, exist_ok=True)
    chart_path = args.out / "demo_chart.png"
    chart = report.result[2][0].mul(255).round().byte().numpy()
    from PIL import Image

    Image.fromarray(chart).save(chart_path)
    print(f"chart: {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
