"""Training memory at FLUX.1-dev width, measured on the CPU with fewer blocks, for an estimate of a GPU run.

    python scripts/train_memory_flux.py DOUBLE SINGLE [--size 1024] [--text-tokens 512] [--parts coarse]
                                        [--checkpointing] [--batch 1] [--steps 2] [--hidden 3072 --heads 24]

A random Flux of FLUX.1-dev's shape (hidden 3072, 24 heads, context 4096) with DOUBLE + SINGLE blocks, its frozen
base in bfloat16 (the trainable parts float32, as the trainer keeps them), trains batch 1 at SIZE px (SIZE/16
squared image tokens) with TEXT_TOKENS text tokens for STEPS steps (AdamW allocates its states in the first
step's update, after that step's peak; from the second step on the peak holds them). Printed (one process per
setting; Linux's peak resident memory, VmHWM, started over before each): the resident memory after the model is
built, and the peak growth of a no-grad student forward and of the training. Two depths give the per-block and the
fixed part of the training's extra memory, which BENCHMARKS.md extrapolates to 19 + 38 blocks. A CPU measurement:
a GPU's allocator and attention kernels differ (an estimate until a GPU run is recorded). `--hidden`/`--heads`:
a smaller width, for the test that keeps this script working.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devtools import host  # noqa: E402  (standard library only, as scripts/gpu_check.py loads it)

host.prepare(cpu=True)
host.load_pack()

import torch  # noqa: E402

from comfyui_dynamic_dit.demo import tiny_flux  # noqa: E402
from comfyui_dynamic_dit.demo import reference as reference_model  # noqa: E402
from comfyui_dynamic_dit.devtools.bench.workloads import FLUX_DEV  # noqa: E402
from comfyui_dynamic_dit.integration import training_host  # noqa: E402
from comfyui_dynamic_dit.training.student import StudentSpec  # noqa: E402
from comfyui_dynamic_dit.training.trainer import TrainConfig, train  # noqa: E402


def memory_mb(field: str) -> float:
    """VmHWM (peak since the last `reset_peak`) or VmRSS (now) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak() -> float:
    """Start the peak over from the current resident memory, which it returns (MB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory_mb("VmRSS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("double", type=int)
    parser.add_argument("single", type=int)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--parts", default="coarse", help="what to learn, as the trainer's --parts")
    parser.add_argument("--coarse-schedule", default="0-100%:2")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="training steps (from the second, AdamW's states are held)")
    parser.add_argument("--hidden", type=int, default=FLUX_DEV["hidden_size"], help="a smaller width for a quick check")
    parser.add_argument("--heads", type=int, default=FLUX_DEV["num_heads"])
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    config = tiny_flux.TinyFlux(**{**FLUX_DEV, "depth": args.double, "depth_single_blocks": args.single,
                                   "hidden_size": args.hidden, "num_heads": args.heads})
    model = reference_model.build_model(config, dtype=torch.bfloat16)
    weights = reset_peak()  # building in float32 peaks higher
    positive, negative = tiny_flux.conditioning(config, text_tokens=args.text_tokens)
    latent = torch.zeros(1, 16, args.size // 8, args.size // 8)
    # Two sampling steps: enough calls to train on; the memory of a step does not depend on the schedule.
    bank = training_host.record_trajectories(model, [(positive, negative)], latent, steps=2, cfg=1.0, sampler="euler",
                                             scheduler="simple", seeds=[1000])
    spec = StudentSpec(parts=tuple(args.parts.split(",")), coarse_schedule=args.coarse_schedule, rank=16)
    student = training_host.build_student(model, bank, spec)
    rows = bank.sample(args.batch, torch.Generator().manual_seed(0))
    resident = reset_peak()
    with torch.no_grad():
        student(rows, noise=0.0)
    forward = memory_mb("VmHWM") - resident
    resident = reset_peak()
    step_started = time.perf_counter()
    train(student, bank, TrainConfig(target=0.5, steps=args.steps, batch=args.batch, eval_rows=1, checkpoint_every=1000,
                                     gradient_checkpointing=args.checkpointing), progress_bar=False)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    step = memory_mb("VmHWM") - resident
    print(f"flux width {args.hidden}, {args.double}+{args.single} blocks, {(args.size // 16) ** 2}+{args.text_tokens} tokens, parts "
          f"{args.parts}{', checkpointing' if args.checkpointing else ''}, batch {args.batch}: resident after the model "
          f"{weights:.0f} MB, then peak growth of a no-grad student forward +{forward:.0f} MB, of a training step "
          f"+{step:.0f} MB ({args.steps} steps); {trainable / 1e6:.1f} M trainable; training "
          f"{time.perf_counter() - step_started:.0f} s, "
          f"all {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
