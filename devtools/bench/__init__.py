"""Speed and fidelity of dynamic settings side by side with ComfyUI's own accelerators, in one process.

    python -m devtools.bench                       # the reference model, every case
    python -m devtools.bench --cases off,easycache:0.1,0.2,tome:0.5 --repeats 5
    python -m devtools.bench --model flux1-dev.safetensors --positive cat.safetensors \\
        --vae ae.safetensors                                              # your own checkpoint
    python -m devtools.bench --full-size-random    # FLUX.1-dev size, timing only
    python -m devtools.bench --tiny-wan --cases off,width:0.5,diffcr:0.5   # a tiny random Wan 2.1 T2V video model

Models: the committed reference model (a small Flux trained on photographs; fidelity is meaningful),
`--model PATH` (a real checkpoint through ComfyUI's own loader, with conditioning files written by
the "Save Conditioning for Dynamic DiT Benchmark" node), `--full-size-random` (FLUX.1-dev-sized random bf16
weights on a GPU, 1024 px, 28 steps; a reduced size on the CPU), `--random` (a tiny random Flux) or
`--tiny-wan` (a random Wan 2.1 T2V built by demo/tiny_wan.py: hidden 256, 4 heads, 6 blocks, a 9-frame
256 px video, 8 Euler steps, cfg 1; `--hidden`, `--heads`, `--blocks`, `--frames`, `--size`, `--steps`).

Cases (`--cases`, comma separated): `off`, `easycache:0.1`, `tome:0.5`, ... A bare value repeats the
case before it with another setting (`easycache:0.05,0.1,0.2`); `+` combines methods on one model
(`width:0.5+diffcr:0.7`; settings of a combination multiply out); `all` is every case at its sweep
settings plus the registered combinations.

Every case samples the same jobs (conditioning x seed) with the same sampler; runs of all cases
interleave (repeat 1 of every case, then repeat 2, ...) so machine noise spreads evenly. Per case:
FLOPs executed vs the unpatched model (executor telemetry), model time (median over repeats of the
summed diffusion-model call times, synchronised on CUDA, and the fastest repeat) and its speedup against
the full-compute baseline of the same process, PSNR and SSIM of the final images against full compute, and the wall
time of the sampling calls. The unpatched model (no executor at all) runs too, for the overhead of
"every method off". Output: a markdown section (stdout, `--markdown FILE` appends it), a Pareto plot
PNG (speedup vs PSNR) and a contact sheet of the final images.
"""
from __future__ import annotations

from .arguments import _parse as parse_arguments


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from .. import host

    host.prepare(cpu=args.device == "cpu")
    host.load_pack()
    from comfyui_dynamic_dit.devtools.bench.cli import run  # the pack's own copy, relative imports and all

    return run(args)
