"""One rank of the DDP test: `python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT_DIR [PARTS [OPTIONS]]`.

Trains a few steps on a tiny Flux under DistributedDataParallel (gloo, CPU) and saves this rank's
student weights and history to OUT_DIR/rank<r>.pt. OPTIONS (comma separated): `checkpointing` (gradient
checkpointing), `on_policy` (one on-policy round after training, as the CLI runs it under torchrun)."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from devtools import host  # noqa: E402  (standard library only, as scripts/gpu_check.py loads it)

host.prepare(cpu=True)
host.load_pack()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from comfyui_dynamic_dit.demo import tiny_flux  # noqa: E402
from comfyui_dynamic_dit.demo import reference as reference_model  # noqa: E402
from comfyui_dynamic_dit.integration import training_host  # noqa: E402
from comfyui_dynamic_dit.training.student import StudentSpec  # noqa: E402
from comfyui_dynamic_dit.training.trainer import TrainConfig, train  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = tiny_flux.TinyFlux()
    model = reference_model.build_model(config)
    jobs = [tiny_flux.conditioning(config, seed=s) for s in range(2)]
    bank = training_host.record_trajectories(model, jobs, torch.zeros(1, 16, 16, 16), steps=4, cfg=2.0, sampler="euler",
                                             scheduler="simple", seeds=[0])
    # a different initial seed per rank: DDP must broadcast rank 0's weights at the start
    parts = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else StudentSpec().parts
    options = sys.argv[3].split(",") if len(sys.argv) > 3 else []
    spec = StudentSpec(parts=parts, coarse_schedule="0-60%:2")
    student = training_host.build_student(model, bank, spec, seed=rank)
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    config = TrainConfig(target=0.7, steps=6, batch=2, checkpoint_every=1000, gradient_checkpointing="checkpointing" in options)
    result = train(student, bank, config, progress_bar=False)
    history = list(result.history)
    if "on_policy" in options:
        bank, round_result = training_host.on_policy_round(model, student, bank, jobs, torch.zeros(1, 16, 16, 16), round_index=0,
                                                           round_steps=3, config=config, steps=4, cfg=2.0, sampler="euler",
                                                           scheduler="simple", seeds=[0])
        history += round_result.history
    torch.save({"state": student.state_dict(), "initial": initial, "history": history}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
