"""Train dynamic parts for a model by self-distillation (no dataset): the CLI front end.

    python -m devtools.train --target 0.5 --steps 600 --out reference/trained/ref_w50
    python -m devtools.train --parts width --target 0.6 --steps 300 --out /tmp/router --resume
    torchrun --nproc_per_node 2 -m devtools.train ...      # DistributedDataParallel (gloo on CPU)

Model: the pack's reference model (default; every photo class, or --classes) or `--tiny` (a random tiny
Flux, for tests). The teacher is the frozen model at full compute: its sampling runs (the model's own
sampler and schedule, cfg with the null conditioning as negative) are recorded once (`--trajectories`
caches them), then the student (the same weights with the parts switched on) learns to match its
outputs at the target FLOPs ratio. Writes one file, `<out>.safetensors` (a bundle of every trained part,
each in its own format: width router, TD-LoRA, patch embedding with `--parts coarse` (the FLOPs follow
`--coarse-schedule`, `--target` is not used), token routers with `--parts tokens[,td_lora]`; each node reads
its part), or with `--part-files` one file per part (`<out>.width.safetensors`, ...); the checkpoint `<out>.ckpt`
(and `<out>.round<k>.ckpt` per on-policy round) is written as training goes and `--resume` continues it
(checkpoints are for resuming, not for shipping: git ignores them).

Developer tooling: it bootstraps a ComfyUI host (`devtools.host`) and trains the reference or a tiny model.
The trainer itself (`training/`, `integration/training_host.py`) is runtime, shared with
the "Train Dynamic DiT" node, which trains the user's own model.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

SAMPLING_DEFAULTS = dict(sampling_steps=16, cfg=2.0, sampler="euler", scheduler="simple")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Flux instead of the reference model (tests)")
    parser.add_argument("--classes", default="", help="reference model classes to distil on, comma separated (default: all)")
    parser.add_argument("--seeds", type=int, default=2, help="sampling runs per conditioning")
    parser.add_argument("--first-seed", type=int, default=None,
                        help="noise seed of the first teacher run (default 1000, the node's too: away from the benchmark's "
                             "seeds 0..7, so it measures unseen noise)")
    parser.add_argument("--size", type=int, default=0, help="latent height and width (default: the reference model's trained size)")
    parser.add_argument("--sampling-steps", type=int, default=SAMPLING_DEFAULTS["sampling_steps"])
    parser.add_argument("--cfg", type=float, default=SAMPLING_DEFAULTS["cfg"])
    parser.add_argument("--sampler", default=SAMPLING_DEFAULTS["sampler"])
    parser.add_argument("--scheduler", default=SAMPLING_DEFAULTS["scheduler"])
    parser.add_argument("--parts", default="width,td_lora",
                        help="what to learn: width, td_lora, tokens (DiffCR token routers and keep ratios; not with width), "
                             "comma separated, or coarse (DDiT's coarse patches, alone)")
    parser.add_argument("--coarse-schedule", default="0-70%:2",
                        help="coarse: the steps that run coarse, as the Patch Scheduler's manual schedule (one factor)")
    parser.add_argument("--coarse-init", default="area", choices=("area", "pinv_bilinear"),
                        help="coarse: start from the training-free coarse path (area) or DDiT's PI-resize layers")
    parser.add_argument("--token-mode", default="diffcr", choices=("diffcr", "sdt"),
                        help="tokens: what a token left out skips, the whole block (DiffCR) or only the MLP (DyDiT's SDT)")
    parser.add_argument("--ratio-regions", type=int, default=4, help="tokens: timestep regions with their own keep ratios")
    parser.add_argument("--ratio-bins", type=int, default=20, help="tokens: keep-ratio bins the training interpolates between")
    parser.add_argument("--min-keep", type=float, default=0.1, help="tokens: the lowest keep ratio a block may learn")
    parser.add_argument("--width-parts", default="both", choices=("both", "heads", "mlp"))
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.5, help="FLOPs of the trained model over full compute, in (0, 1]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3, help="TD-LoRA learning rate")
    parser.add_argument("--router-lr", type=float, default=2e-2)
    parser.add_argument("--weight", type=float, default=20.0, help="lambda of the compute term")
    parser.add_argument("--feature-weight", type=float, default=0.0, help="per-block feature distillation weight")
    parser.add_argument("--mutation", default="allow", choices=("allow", "clone"))
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each block in backward: less memory for about one more forward per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output path stem (<out>.safetensors)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.ckpt when it exists")
    parser.add_argument("--on-policy-rounds", type=int, default=0,
                        help="after training, rounds of sampling with the student and training on the states it visits (DAgger)")
    parser.add_argument("--on-policy-steps", type=int, default=0, help="training steps per on-policy round (default: steps / 2)")
    parser.add_argument("--part-files", action="store_true",
                        help="one file per part (<out>.width/.td_lora/.patch_embedding/.token_router.safetensors) "
                             "instead of the one bundle <out>.safetensors")
    parser.add_argument("--bundle-parts", type=Path, default=None, metavar="STEM",
                        help="train nothing: bundle the part files of an earlier run (<STEM>.width.safetensors, ...) "
                             "into <out>.safetensors, with that run's metadata")
    parser.add_argument("--trajectories", type=Path, default=None, help="cache file of the teacher's recorded calls")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    from . import host

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    host.prepare(cpu=not _cuda_wanted())
    host.load_pack()  # the pack's package (its own relative imports), loaded before anything is checked
    if args.bundle_parts is not None:
        return _bundle_parts(args.bundle_parts, args.out)
    from comfyui_dynamic_dit.training.student import StudentSpec
    from comfyui_dynamic_dit.training.trainer import TrainConfig

    # bad input: refused before anything is sampled
    spec = StudentSpec(parts=tuple(p.strip() for p in args.parts.split(",") if p.strip()), width_parts=args.width_parts,
                       experts=args.experts, rank=args.rank, coarse_schedule=args.coarse_schedule, coarse_init=args.coarse_init,
                       ratio_regions=args.ratio_regions, ratio_bins=args.ratio_bins, min_keep=args.min_keep,
                       token_mode=args.token_mode)
    spec.validate()
    config = TrainConfig(target=args.target, steps=args.steps, batch=args.batch, lr=args.lr, router_lr=args.router_lr,
                         weight=args.weight, feature_weight=args.feature_weight, mutation=args.mutation, seed=args.seed,
                         gradient_checkpointing=args.gradient_checkpointing)
    config.validate()
    if args.on_policy_rounds < 0 or args.on_policy_steps < 0:
        raise SystemExit("--on-policy-rounds and --on-policy-steps must be >= 0")
    if args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from comfyui_dynamic_dit.demo import tiny_flux  # the pack's own copies (loaded as its package by the host)
    from comfyui_dynamic_dit.integration import training_host
    from comfyui_dynamic_dit.training import export, student as student_module, trainer
    from comfyui_dynamic_dit.training.trajectories import TEACHER_FIRST_SEED, teacher_seeds as seeds_from

    if args.first_seed is None:
        args.first_seed = TEACHER_FIRST_SEED
    teacher_seeds = seeds_from(args.seeds, args.first_seed)

    # the same settings as the pack's own classes (the pack is loaded as its own package by the host)
    spec = student_module.StudentSpec(**{f: getattr(spec, f) for f in spec.__dataclass_fields__})
    config = trainer.TrainConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__})

    rank = 0
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() and _cuda_wanted() else "gloo")
        rank = dist.get_rank()
    log = trainer.print_log if rank == 0 else (lambda line: None)

    model, jobs, size, base_name = _model_and_jobs(args, tiny_flux)
    latent = torch.zeros(1, model.model.latent_format.latent_channels, size, size)
    started = time.perf_counter()
    bank = None
    if args.trajectories is not None and args.trajectories.is_file():
        bank = training_host.Trajectories.load(str(args.trajectories))
        log(f"teacher trajectories: {bank.rows} rows from {args.trajectories}")
    elif rank == 0 or not distributed or args.trajectories is None:
        bank = training_host.record_trajectories(
            model, jobs, latent, steps=args.sampling_steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler,
            seeds=teacher_seeds, progress=lambda done, total: log(f"teacher run {done}/{total}"))
        log(f"teacher trajectories: {bank.rows} rows, {len(bank.timesteps)} steps, {time.perf_counter() - started:.0f} s")
        if args.trajectories is not None and rank == 0:
            args.trajectories.parent.mkdir(parents=True, exist_ok=True)
            bank.save(str(args.trajectories))
    if distributed and bank is None:
        torch.distributed.barrier()  # rank 0 recorded and saved them
        bank = training_host.Trajectories.load(str(args.trajectories))
    elif distributed and args.trajectories is not None:
        torch.distributed.barrier()

    student = training_host.build_student(model, bank, spec, seed=args.seed)
    checkpoint = args.out.with_name(args.out.name + ".ckpt")
    if not args.resume and rank == 0:
        training_host.remove_checkpoints(checkpoint)  # a fresh run
    if distributed:
        torch.distributed.barrier()
    trained_from = time.perf_counter()
    result = trainer.train(student, bank, config, checkpoint=checkpoint, progress_bar=not args.no_progress, log=log)
    round_steps = training_host.round_steps_for(args.steps, args.on_policy_steps)
    for index in range(args.on_policy_rounds):
        bank, result = training_host.on_policy_round(
            model, student, bank, jobs, latent, round_index=index, round_steps=round_steps, config=config,
            steps=args.sampling_steps, cfg=args.cfg, sampler=args.sampler, scheduler=args.scheduler,
            seeds=teacher_seeds, log=log,
            checkpoint=training_host.round_checkpoint(checkpoint, index))
    if rank == 0:
        command = "python -m devtools.train " + shlex.join(argv)
        metadata = export.training_metadata(
            student, target=args.target, steps=args.steps + args.on_policy_rounds * round_steps, command=command,
            base_model=base_name,
            extra={"final_flops_ratio": f"{result.final_ratio:.4f}", "eval_distill_loss": f"{result.eval_loss:.5f}",
                   "train_seconds": f"{time.perf_counter() - trained_from:.0f}", "world_size": str(int(os.environ.get('WORLD_SIZE', '1'))),
                   "sampling": json.dumps({"steps": args.sampling_steps, "cfg": args.cfg, "sampler": args.sampler,
                                           "scheduler": args.scheduler, "seeds": args.seeds, "first_seed": args.first_seed, "latent": size})})
        paths = export.save_student(student, args.out, metadata) if args.part_files else [export.save_bundle(student, args.out, metadata)]
        log(f"FLOPs ratio {result.final_ratio:.3f} (target {args.target}), eval distillation loss {result.eval_loss:.4f}, "
            f"{(time.perf_counter() - trained_from) / 60:.1f} min of training; wrote {', '.join(str(p) for p in paths)}")
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def _bundle_parts(stem: Path, out: Path) -> int:
    """One bundle from a run's part files: what the Train node would have written for that run."""
    from comfyui_dynamic_dit.core.files import header_metadata
    from comfyui_dynamic_dit.integration.trained_files import run_files
    from comfyui_dynamic_dit.training import export

    paths = run_files(stem)
    if not paths:
        raise SystemExit(f"no part files of a training run start with {stem}")
    metadata = {k: v for k, v in header_metadata(paths[0]).items() if k not in ("format", "version")}
    print(f"wrote {export.bundle_part_files(paths, out, metadata)} from {', '.join(p.name for p in paths)}")
    return 0


def _cuda_wanted() -> bool:
    return os.environ.get("DYNAMIC_DIT_TRAIN_DEVICE", "cpu") == "cuda"


def _model_and_jobs(args: argparse.Namespace, tiny_flux):
    """The model patcher, (positive, negative) jobs, latent size and a name for the metadata."""
    from comfyui_dynamic_dit.demo import reference as reference_model

    if args.tiny:
        config = tiny_flux.TinyFlux()
        jobs = [tiny_flux.conditioning(config, seed=s) for s in range(2)]
        return reference_model.build_model(config), jobs, args.size or 16, f"random tiny Flux ({tiny_flux.describe(config)})"
    reference = reference_model.load_reference()
    names = [c.strip() for c in args.classes.split(",") if c.strip()] or list(reference.classes)
    jobs = [(reference.conditioning(name), reference.null_conditioning()) for name in names]
    return reference.model, jobs, args.size or reference.image_size // 2, f"reference model {reference_model.REFERENCE_PATH.name}"


if __name__ == "__main__":
    raise SystemExit(main())
