"""The self-distillation loop: student vs the cached teacher outputs, plus the compute term.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .mutation import MUTATION_MODES, mutation_context
from .objectives import ComputeTarget, feature_loss
from .student import DynamicStudent
from .trajectories import Trajectories


@dataclass(frozen=True)
class TrainConfig:
    target: float = 0.5  # FLOPs of the trained model over full compute, averaged over the schedule's steps
    steps: int = 300
    batch: int = 8  # rows (samples of recorded calls) per step and process
    lr: float = 2e-3  # TD-LoRA experts and gate
    router_lr: float = 2e-2  # width routers
    weight: float = 20.0  # lambda of the compute term
    hold: int = -1  # steps at full compute before the warm-down; -1: 5 % of the steps
    warmup: int = -1  # steps of the warm-down from 1 to the target; -1: 40 % of the steps
    temperature: float = 1.0  # Gumbel-sigmoid temperature of the straight-through gates
    noise_until: float = 0.8  # share of the steps with Gumbel noise; then the gates are the deterministic ones
    feature_weight: float = 0.0
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, about one more forward
    mutation: str = "allow"  # "allow" (copy a saved tensor before a write, mutation.py) or "clone" (clone every saved tensor)
    seed: int = 0
    checkpoint_every: int = 50
    eval_rows: int = 16

    def validate(self) -> None:
        if not (isinstance(self.target, (int, float)) and 0.0 < self.target <= 1.0):
            raise ValueError(f"Trainer: the target FLOPs ratio must be in (0, 1] (a share of full compute), got {self.target}.")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"Trainer: steps and batch must be >= 1, got steps={self.steps}, batch={self.batch}.")
        if not (self.lr > 0 and self.router_lr > 0 and self.weight >= 0):
            raise ValueError("Trainer: learning rates must be > 0 and the compute weight >= 0.")
        if self.mutation not in MUTATION_MODES:
            raise ValueError(f"Trainer: mutation must be one of {', '.join(MUTATION_MODES)}, got '{self.mutation}'.")

    def compute_target(self) -> ComputeTarget:
        hold = self.hold if self.hold >= 0 else self.steps // 20
        warmup = self.warmup if self.warmup >= 0 else max(1, int(self.steps * 0.4))
        return ComputeTarget(self.target, warmup=warmup, hold=hold, weight=self.weight)


@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    final_ratio: float = math.nan  # deterministic decisions, averaged over the schedule's steps
    eval_loss: float = math.nan  # deterministic student on fixed rows
    seconds: float = 0.0


def distillation(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """MSE relative to the teacher's mean square: comparable across models and latent scales."""
    teacher = teacher_out.float()
    return F.mse_loss(student_out.float(), teacher) / teacher.pow(2).mean().clamp_min(1e-12)


def _rank() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="Dynamic DiT training", dynamic_ncols=True)


def _optimizer(student: DynamicStudent, config: TrainConfig) -> torch.optim.Optimizer:
    routers = student.decision_parameters()  # width routers, token routers and keep ratios
    chosen = {id(p) for p in routers}
    others = [p for p in student.parameters() if id(p) not in chosen]
    groups = [g for g in ({"params": routers, "lr": config.router_lr}, {"params": others, "lr": config.lr}) if g["params"]]
    return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=0.0)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over 10 steps, then cosine to 10 % over the run."""
    if step < 10:
        return (step + 1) / 10
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


def schedule_ratio(student: DynamicStudent, bank: Trajectories, *, noise: float = 0.0, temperature: float = 1.0,
                   generator: torch.Generator | None = None, grad: bool = False) -> Any:
    """The FLOPs ratio of a sampling run: the decisions at every step of the schedule, averaged (a run calls
    the model once per step, at the shape of the recorded calls). With noise 0 the deterministic decisions
    inference makes (a float); with `grad` a differentiable tensor."""
    return student.run_ratio(bank, noise=noise, temperature=temperature, generator=generator, grad=grad)


@torch.no_grad()
def evaluate(student: DynamicStudent, bank: Trajectories, rows: int, mode: str = "allow") -> float:
    batch = bank.fixed(rows)
    out, _ = student(batch, noise=0.0)
    return float(distillation(out, batch["target"]))


def _teacher_features(student: DynamicStudent, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The frozen model's block outputs on the batch (full compute, no bypass), for the feature loss."""
    record: list[torch.Tensor] = []
    patches = {}
    adapter = student.adapter
    for block in student.blocks:
        def patch(args: dict, extra: dict, record=record, block=block) -> dict:
            out = extra["original_block"](args)
            record.append(adapter.hidden_states(block, out).clone())
            return out
        patches[adapter.patch_key(block)] = patch
    arguments = student.arguments(batch)
    latent = adapter.latent_argument
    with torch.no_grad(), student.host_training():  # the host's blocks add into their inputs in place: copy the latent
        student.diffusion_model(**{**arguments, latent: arguments[latent].clone()},
                                transformer_options={"patches_replace": {"dit": patches}, "sigmas": batch["sigmas"]})
    return record


def train(student: DynamicStudent, bank: Trajectories, config: TrainConfig, *, checkpoint: str | os.PathLike | None = None,
          callback: Callable[[int, int, dict[str, float]], None] | None = None, progress_bar: bool = True,
          log: Callable[[str], None] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train `student` on `bank`; resumes from `checkpoint` when it exists and saves to it every
    `checkpoint_every` steps and at the end. `stop_after` ends the run early at that step (with a
    checkpoint), as an interrupted run would. Returns the history and the final deterministic ratio."""
    # ComfyUI runs nodes under torch.inference_mode(), whose tensors autograd cannot use: train outside it
    with torch.inference_mode(False):
        return _train(student, bank, config, checkpoint=checkpoint, callback=callback, progress_bar=progress_bar,
                      log=log, stop_after=stop_after)


class _TrainingRun:
    """One run's state (optimiser, generator, history, clock), its resume from a checkpoint and its checkpoints."""

    def __init__(self, student: DynamicStudent, bank: Trajectories, config: TrainConfig,
                 checkpoint: str | os.PathLike | None, log: Callable[[str], None] | None):
        self.student, self.config = student, config
        self.rank, self.world = _rank()
        self.schedule_bank = bank  # the whole schedule: what the run's FLOPs ratio is measured on
        self.bank = student.training_rows(bank)  # e.g. coarse patches change the coarse steps' calls only
        self.optimizer = _optimizer(student, config)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.target = config.compute_target()
        self.start, self.history, spent = 0, [], 0.0
        self.path = Path(checkpoint) if checkpoint is not None else None
        if self.path is not None and self.path.is_file():
            spent = self._resume()
            if log:
                log(f"resumed from {self.path} at step {self.start} of {config.steps}")
        self.started = time.perf_counter() - spent
        self.model: torch.nn.Module = student
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(student, find_unused_parameters=False)

    def _resume(self) -> float:
        state = torch.load(self.path, weights_only=False, map_location=self.student.device)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        generators = state["generators"]
        self.generator.set_state(generators[self.rank] if self.rank < len(generators) else generators[0])
        self.start, self.history = int(state["step"]), list(state["history"])
        return float(state["seconds"])

    def save(self, step: int) -> None:
        if self.path is None:
            return
        generators = [self.generator.get_state()]
        if self.world > 1:
            import torch.distributed as dist

            generators = [None] * self.world
            dist.all_gather_object(generators, self.generator.get_state())
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_name(self.path.name + ".tmp")
            torch.save(dict(student=self.student.state_dict(), optimizer=self.optimizer.state_dict(), generators=generators,
                            step=step, history=self.history, seconds=time.perf_counter() - self.started,
                            config=asdict(self.config)), temporary)
            os.replace(temporary, self.path)  # a run killed while saving keeps the previous checkpoint

    def step(self, step: int) -> dict[str, float]:
        """One optimiser step: the learning rate of the step, the loss on a fresh batch, the update."""
        config, student = self.config, self.student
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * _lr_factor(step, config.steps)
        batch = self.bank.sample(config.batch, self.generator, student.device)
        target = self.target.at(step)
        noise = 1.0 if step < config.noise_until * config.steps else 0.0
        with torch.enable_grad(), mutation_context(config.mutation):
            record: list[torch.Tensor] | None = [] if config.feature_weight > 0 else None
            out, ratios = self.model(batch, temperature=config.temperature, noise=noise, generator=self.generator,
                                     record_blocks=record)
            distill = distillation(out, batch["target"])
            # The compute term is on the run's ratio: fresh gate draws at every step of the schedule, so the
            # ratio inference executes (deterministic gates, every step once) is what training drives to the target.
            ratio = schedule_ratio(student, self.schedule_bank, noise=noise, temperature=config.temperature,
                                   generator=self.generator, grad=True) if self.bank.timesteps else ratios.mean()
            loss = distill + self.target.weight * (ratio - target) ** 2 if student.learns_compute else distill
            if record is not None:
                loss = loss + config.feature_weight * feature_loss(record, _teacher_features(student, batch))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        self.optimizer.step()
        student.after_step()  # e.g. keep ratios stay in [min_keep, 1]
        entry = {"step": step + 1, "loss": float(loss.detach()), "distill": float(distill.detach()),
                 "ratio": float(ratio.detach()), "target": target}
        self.history.append(entry)
        return entry


def _report(run: _TrainingRun, entry: dict[str, float], end: int, bar: Any, log: Callable[[str], None] | None,
            callback: Callable[[int, int, dict[str, float]], None] | None) -> None:
    steps, goal = run.config.steps, run.student.learns_compute
    if bar is not None:
        bar.update(1)
        bar.set_postfix(distill=f"{entry['distill']:.4f}", flops=f"{entry['ratio']:.3f}",
                        **({"target": f"{entry['target']:.3f}"} if goal else {}))
    elif log and run.rank == 0 and (entry["step"] % 25 == 0 or entry["step"] == end):
        aim = f" (target {entry['target']:.3f})" if goal else ""
        log(f"step {entry['step']}/{steps} distill {entry['distill']:.4f} FLOPs {entry['ratio']:.3f}{aim}")
    if callback is not None and run.rank == 0:
        callback(entry["step"], steps, entry)


def _train(student: DynamicStudent, bank: Trajectories, config: TrainConfig, *, checkpoint: str | os.PathLike | None,
           callback: Callable[[int, int, dict[str, float]], None] | None, progress_bar: bool,
           log: Callable[[str], None] | None, stop_after: int | None) -> TrainResult:
    config.validate()
    if bank.rows == 0:
        raise ValueError("Trainer: no teacher trajectories (no conditioning?) to train on.")
    for part in student.parts.values():
        part.check_training(config)
    student.gradient_checkpointing = config.gradient_checkpointing
    run = _TrainingRun(student, bank, config, checkpoint, log)
    bar = _progress_bar(config.steps, run.start, progress_bar and run.rank == 0)
    end = config.steps if stop_after is None else min(config.steps, stop_after)
    for step in range(run.start, end):
        entry = run.step(step)
        _report(run, entry, end, bar, log, callback)
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
            run.save(step + 1)
    if bar is not None:
        bar.close()
    student.eval()
    result = TrainResult(steps=end, history=run.history, seconds=time.perf_counter() - run.started)
    result.final_ratio = schedule_ratio(student, run.schedule_bank)
    result.eval_loss = evaluate(student, run.bank, config.eval_rows)
    student.train()
    return result


def print_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


__all__ = ["TrainConfig", "TrainResult", "distillation", "evaluate", "schedule_ratio", "train"]
