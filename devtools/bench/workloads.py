"""What the benchmark samples: the reference model, a random Flux, a random tiny Wan, or a real checkpoint."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ...demo.conditioning_file import load_conditioning
from .fidelity import latent_preview
from .runner import Job, Workload

# --- model sources -------------------------------------------------------------------------------
FLUX_DEV = dict(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, context_dim=4096, vec_dim=768)


def _jobs(positives: list[tuple[str, list]], negative: list, seeds: Sequence[int]) -> list[Job]:
    return [Job(f"{label} seed {seed}", positive, negative, seed) for label, positive in positives for seed in seeds]


def reference_workload(args: argparse.Namespace) -> Workload:
    from ...demo import reference as reference_model

    reference = reference_model.load_reference(args.reference)
    size = args.size or reference.image_size
    classes = args.classes.split(",") if args.classes else list(reference.classes)[:4]
    positives = [(name, reference.conditioning(name)) for name in classes]
    steps = args.steps or 16
    cfg = 2.0 if args.cfg is None else args.cfg
    sample = dict(height=size // 2, width=size // 2, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    config = reference.config
    return Workload(
        reference.model, _jobs(positives, reference.null_conditioning(), args.seeds), sample, reference_model.latent_to_photo,
        args.title or f"Reference model, {size} px",
        f"Reference model ({Path(args.reference or reference_model.REFERENCE_PATH).name}: Flux, hidden {config.hidden_size}, "
        f"{config.num_heads} heads, {config.depth} double + {config.depth_single_blocks} single blocks, trained on photos at "
        f"{reference.image_size} px); {size}x{size} px ({(size // 4) ** 2} image tokens), {steps} steps {args.sampler} "
        f"{args.scheduler}, cfg {cfg:g}; classes {', '.join(classes)}; seeds {', '.join(map(str, args.seeds))}",
        "exact pixels of the reference model's final latents (its fixed invertible transform, no VAE)",
    )


def random_workload(args: argparse.Namespace, full_size: bool) -> Workload:
    import torch

    from ...demo import reference as reference_model, tiny_flux

    on_gpu = args.device == "cuda"
    if full_size:
        double = args.double if args.double is not None else (19 if on_gpu else 1)
        single = args.single if args.single is not None else (38 if on_gpu else 2)
        config = tiny_flux.TinyFlux(**{**FLUX_DEV, "depth": double, "depth_single_blocks": single})
        dtype = torch.bfloat16 if on_gpu else torch.float32
        size, steps = args.size or (1024 if on_gpu else 128), args.steps or (28 if on_gpu else 4)
        text_tokens = args.text_tokens or (512 if on_gpu else 32)
        reduced = (double, single, size, steps) != (19, 38, 1024, 28)
        title = args.title or ("FLUX.1-dev size, random weights" + (" (reduced)" if reduced else ""))
        what = (f"FLUX.1-dev-shaped random weights (hidden 3072, 24 heads, {double} double + {single} single blocks, "
                f"{str(dtype).replace('torch.', '')}, {text_tokens} text tokens)")
        if reduced:
            what += (f"; REDUCED from 19 + 38 blocks, 1024 px, 28 steps"
                     + ("" if on_gpu else " because this runs on the CPU (FLUX.1-dev size needs a GPU)"))
    else:
        config = tiny_flux.TinyFlux(hidden_size=args.hidden or 768, num_heads=args.heads or 12, depth=args.double or 2,
                                    depth_single_blocks=args.single if args.single is not None else 4)
        dtype, size, steps, text_tokens = torch.float32, args.size or 512, args.steps or 6, args.text_tokens or 8
        title = args.title or f"Random tiny Flux, {size} px"
        what = (f"random tiny Flux (hidden {config.hidden_size}, {config.num_heads} heads, {config.depth} double + "
                f"{config.depth_single_blocks} single blocks)")
    print(f"building {what} ...", flush=True)
    model = reference_model.build_model(config, dtype=dtype, device=args.device if full_size and on_gpu else None)
    positive, negative = tiny_flux.conditioning(config, text_tokens=text_tokens)
    cfg = 1.0 if args.cfg is None else args.cfg
    sample = dict(height=size // 8, width=size // 8, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    return Workload(
        model, _jobs([("random conditioning", positive)], negative, args.seeds), sample,
        latent_preview(model.model.latent_format), title,
        f"{what}; {size}x{size} px ({(size // 16) ** 2} image tokens), {steps} steps {args.sampler} {args.scheduler}, "
        f"cfg {cfg:g}, batch 1; seeds {', '.join(map(str, args.seeds))}",
        "ComfyUI's linear latent-to-RGB preview of the final latents", meaningful_fidelity=False,
    )


def tiny_wan_workload(args: argparse.Namespace) -> Workload:
    """A random-weight Wan 2.1 T2V built through ComfyUI's own detection (demo/tiny_wan.py), sampling a
    short video: the workload of BENCHMARKS.md's tiny-Wan rows."""
    from ...demo import tiny_wan

    hidden, heads, blocks = args.hidden or 256, args.heads or 4, args.blocks or 6
    config = tiny_wan.TinyWan(hidden_size=hidden, num_heads=heads, depth=blocks, ffn_dim=4 * hidden)
    size, frames = args.size or 256, args.frames
    text_tokens = args.text_tokens or 32
    latent_frames = (frames - 1) // 4 + 1
    tokens = latent_frames * (size // 16) ** 2
    what = (f"random tiny Wan 2.1 T2V built through ComfyUI's own model detection (hidden {hidden}, {heads} heads, "
            f"{blocks} blocks, FFN {config.ffn_dim}, {text_tokens} text tokens of width {config.text_dim})")
    print(f"building {what} ...", flush=True)
    model = tiny_wan.build_model(config)
    positive, negative = tiny_wan.conditioning(config, text_tokens=text_tokens)
    cfg = 1.0 if args.cfg is None else args.cfg
    latent = tiny_wan.latent(config, video_frames=frames, height=size // 8, width=size // 8)
    return _random_video(args, model, positive, negative, latent, cfg, f"Tiny Wan 2.1 T2V, random weights, {frames} frames of {size} px",
                         f"{what}; a {frames}-frame video ({latent_frames} latent frames of {size // 8}x{size // 8} latent "
                         f"pixels, {size}x{size} px: {tokens} video tokens)")


def _random_video(args: argparse.Namespace, model, positive: list, negative: list, latent, cfg: float, title: str,
                  what: str) -> Workload:
    """A random-weight video model sampling `latent` (fidelity: ComfyUI's latent preview, not meaningful)."""
    steps = args.steps or 8
    sample = dict(latent=latent, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    return Workload(
        model, _jobs([("random conditioning", positive)], negative, args.seeds), sample,
        latent_preview(model.model.latent_format), args.title or title,
        f"{what}, {steps} steps {args.sampler} {args.scheduler}, cfg {cfg:g}, batch 1; seeds {', '.join(map(str, args.seeds))}",
        "ComfyUI's linear latent-to-RGB preview of the final latents, the latent frames side by side",
        meaningful_fidelity=False,
    )


def tiny_ltxv_workload(args: argparse.Namespace) -> Workload:
    """A random-weight LTX-Video 0.9 built through ComfyUI's own detection (demo/tiny_ltxv.py), sampling a short video;
    at `--hidden 2048 --heads 32` and a realistic token count, the CPU proxy of the 2B model's blocks."""
    from ...demo import tiny_ltxv

    hidden, heads, blocks = args.hidden or 256, args.heads or 4, args.blocks or 6
    config = tiny_ltxv.TinyLTXV(num_heads=heads, head_dim=hidden // heads, depth=blocks)
    size, frames = args.size or 256, args.frames
    text_tokens = args.text_tokens or 32
    latent_frames = (frames - 1) // 8 + 1
    tokens = latent_frames * (size // 32) ** 2
    what = (f"random LTX-Video 0.9 built through ComfyUI's own model detection (hidden {hidden}, {heads} heads, {blocks} "
            f"blocks, feed-forward {4 * hidden}, {text_tokens} text tokens of width {config.caption_channels})")
    print(f"building {what} ...", flush=True)
    model = tiny_ltxv.build_model(config)
    positive, negative = tiny_ltxv.conditioning(config, text_tokens=text_tokens)
    latent = tiny_ltxv.latent(frames=latent_frames, height=size // 32, width=size // 32)
    return _random_video(args, model, positive, negative, latent, 3.0 if args.cfg is None else args.cfg,
                         f"LTX-Video, random weights, {frames} frames of {size} px",
                         f"{what}; a {frames}-frame video ({latent_frames} latent frames of {size // 32}x{size // 32} latent "
                         f"pixels: {tokens} video tokens)")


def checkpoint_workload(args: argparse.Namespace) -> Workload:
    import torch

    import comfy.sd
    import comfy.utils

    from ...integration.patching import adapter_of

    if not args.positive:
        raise ValueError("--model needs --positive FILE (a conditioning file from the 'Save Conditioning for Dynamic DiT Benchmark' node)")
    options = {"dtype": getattr(torch, args.dtype)} if args.dtype else {}
    print(f"loading {args.model} through ComfyUI's loader ...", flush=True)
    model = comfy.sd.load_diffusion_model(str(args.model), model_options=options)
    adapter = adapter_of(model)  # refuses anything that is not Flux.1, with the reason
    arch = adapter.arch
    positives = [(Path(p).stem, load_conditioning(p, arch.context_dim, arch.vec_dim)) for p in args.positive]
    cfg = 1.0 if args.cfg is None else args.cfg
    if args.negative:
        negative = load_conditioning(args.negative, arch.context_dim, arch.vec_dim)
    elif cfg != 1.0:
        raise ValueError("cfg > 1 needs --negative FILE")
    else:
        negative = positives[0][1]  # unused at cfg 1
    if args.guidance is not None:
        for _, conditioning in [*positives, ("negative", negative)]:
            conditioning[0][1]["guidance"] = args.guidance
    size, steps = args.size or 1024, args.steps or 28
    if args.vae:
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(args.vae)))

        def to_image(latent):
            return vae.decode(latent).movedim(-1, 1).float().clamp(0, 1)

        fidelity = f"images decoded with {Path(args.vae).name}"
    else:
        to_image = latent_preview(model.model.latent_format)
        fidelity = "ComfyUI's linear latent-to-RGB preview of the final latents (approximate: pass --vae for decoded images)"
    sample = dict(height=size // 8, width=size // 8, steps=steps, sampler=args.sampler, scheduler=args.scheduler, cfg=cfg)
    return Workload(
        model, _jobs(positives, negative, args.seeds), sample, to_image, args.title or f"{Path(args.model).name}, {size} px",
        f"{Path(args.model).name} (hidden {arch.hidden_size}, {arch.depth_double} double + {arch.depth_single} single blocks, "
        f"{str(model.model.get_dtype()).replace('torch.', '')}); {size}x{size} px, {steps} steps {args.sampler} {args.scheduler}, "
        f"cfg {cfg:g}; prompts {', '.join(label for label, _ in positives)}; seeds {', '.join(map(str, args.seeds))}",
        fidelity,
    )
