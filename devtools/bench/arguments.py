"""The benchmark's command line (nothing here imports ComfyUI or the pack: it is read before the host is prepared)."""
from __future__ import annotations

import argparse
from pathlib import Path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=_description(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--reference", type=Path, default=None, help="a reference model file (default: the committed one)")
    source.add_argument("--model", type=Path, help="a Flux.1 checkpoint, loaded through ComfyUI's own loader")
    source.add_argument("--full-size-random", action="store_true", help="FLUX.1-dev-sized random bf16 weights (timing only)")
    source.add_argument("--random", action="store_true", help="a tiny random Flux (--hidden, --heads, --double, --single)")
    source.add_argument("--tiny-wan", action="store_true",
                        help="a tiny random Wan 2.1 T2V video model (--hidden, --heads, --blocks, --frames; default hidden 256, "
                             "4 heads, 6 blocks, 9 frames of 256 px, 8 steps, cfg 1)")
    source.add_argument("--tiny-ltxv", action="store_true",
                        help="a random LTX-Video 0.9 (--hidden, --heads, --blocks, --frames: 8n + 1; default hidden 256, 4 heads, "
                             "6 blocks, 256 px, 8 steps, cfg 3)")
    parser.add_argument("--cases", default="all", help="comma separated, see above (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", default="0", help="comma separated seeds; every case samples every seed")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--scheduler", default="simple")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--classes", default=None, help="reference model: comma separated photo classes (default: the first four)")
    parser.add_argument("--positive", nargs="+", type=Path, help="--model: conditioning files, one job per file and seed")
    parser.add_argument("--negative", type=Path, help="--model: the negative conditioning file (cfg > 1)")
    parser.add_argument("--guidance", type=float, default=None, help="--model: Flux guidance (default: from the file)")
    parser.add_argument("--vae", type=Path, help="--model: decode final latents with this VAE for PSNR/SSIM")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="--model: weight dtype")
    parser.add_argument("--hidden", type=int, default=None, help="--random: default 768; --tiny-wan: default 256")
    parser.add_argument("--heads", type=int, default=None, help="--random: default 12; --tiny-wan: default 4")
    parser.add_argument("--blocks", type=int, default=None, help="--tiny-wan: Wan blocks (default 6)")
    parser.add_argument("--frames", type=int, default=9, help="--tiny-wan: video frames, 4n + 1 (default 9: 3 latent frames)")
    parser.add_argument("--double", type=int, default=None, help="double blocks (--random, --full-size-random)")
    parser.add_argument("--single", type=int, default=None, help="single blocks (--random, --full-size-random)")
    parser.add_argument("--text-tokens", type=int, default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--title", default=None)
    parser.add_argument("--markdown", type=Path, help="append the section to this file (e.g. BENCHMARKS.md)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the plot and images (default: benchmarks/ next to --markdown, else out/bench)")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma separated integers, got '{args.seeds}'")
    if not args.seeds:
        parser.error("--seeds: give at least one seed")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.frames < 1 or args.frames % 4 != 1:
        parser.error(f"--frames: Wan videos have 4n + 1 frames (1, 5, 9, ...), got {args.frames}")
    if args.size is not None and args.size % 16:
        parser.error(f"--size must be a multiple of 16, got {args.size}")
    return args


def _description() -> str:
    from . import __doc__ as text

    return text
