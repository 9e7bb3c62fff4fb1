"""Peak memory of one training step on the reference model, per way of handling ComfyUI's in-place block adds.

    python scripts/train_memory.py allow|clone|torch|nograd [batch] [checkpointing] [bfloat16]

Runs in a fresh process per mode (ru_maxrss only grows): records one teacher run (one class), builds the
student, runs one no-grad student forward of the batch (baseline), then 3 training steps, and prints the
growth of the peak resident memory over the baseline: what autograd keeps for backward in that mode, and the
seconds per training step. `torch` is torch's own `allow_mutation_on_saved_tensors()` (which the trainer's
"allow" replaces, see training/mutation.py), for comparison. `checkpointing`: gradient checkpointing
of every block; `bfloat16`: the frozen base in bfloat16 (the trainable parts stay float32).
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from devtools import host  # noqa: E402  (standard library only, as scripts/gpu_check.py loads it)

host.prepare(cpu=True)
host.load_pack()

import torch  # noqa: E402

from comfyui_dynamic_dit.demo import reference as reference_model  # noqa: E402
from comfyui_dynamic_dit.integration import training_host  # noqa: E402
from comfyui_dynamic_dit.training.student import StudentSpec  # noqa: E402
from comfyui_dynamic_dit.training.trainer import TrainConfig, train  # noqa: E402


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    mode, batch = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8
    options = set(sys.argv[3:])
    torch.set_num_threads(1)
    reference = reference_model.load_reference(dtype=torch.bfloat16 if "bfloat16" in options else torch.float32)
    jobs = [(reference.conditioning("astronaut"), reference.null_conditioning())]
    bank = training_host.record_trajectories(reference.model, jobs, torch.zeros(1, 16, 32, 32), steps=16, cfg=2.0,
                                             sampler="euler", scheduler="simple", seeds=[1000])
    student = training_host.build_student(reference.model, bank, StudentSpec())
    rows = bank.sample(batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        student(rows, noise=0.0)
    baseline = peak_mb()
    seconds = 0.0
    if mode != "nograd":
        if mode == "torch":
            from comfyui_dynamic_dit.training import trainer

            trainer.mutation_context = lambda _: torch.autograd.graph.allow_mutation_on_saved_tensors()
        started = time.perf_counter()
        train(student, bank, TrainConfig(target=0.5, steps=3, batch=batch, mutation="allow" if mode == "torch" else mode,
                                         gradient_checkpointing="checkpointing" in options, checkpoint_every=1000),
              progress_bar=False)
        seconds = (time.perf_counter() - started) / 3
    print(f"{mode} {' '.join(sorted(options))}: batch {batch}, peak RSS {peak_mb():.0f} MB, +{peak_mb() - baseline:.0f} MB over the no-grad forward, "
          f"{seconds:.2f} s per training step (with the final evaluation)")


if __name__ == "__main__":
    main()
