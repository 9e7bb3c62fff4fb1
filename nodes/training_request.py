"""What the Train node asks for, checked before anything runs, and the run itself: the teacher's sampling runs, the
training, the on-policy rounds and the file, with their progress on the node."""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any

import torch

from ..integration.patching import MODEL_FOLDER, adapter_of
from ..integration.progress_text import PhaseText
from ..methods.width.settings import PART_LABELS
from ..training.export import suffixes
from ..training.student import StudentSpec
from ..training.trainer import TrainConfig, TrainResult
from ..training.trajectories import teacher_seeds


PARTS = {"width + TD-LoRA": ("width", "td_lora"), "width": ("width",), "TD-LoRA": ("td_lora",),
         "coarse patches (DDiT)": ("coarse",), "token routers + TD-LoRA (DiffCR)": ("tokens", "td_lora"),
         "token routers (DiffCR)": ("tokens",), "MLP token routers + TD-LoRA (DyDiT SDT)": ("tokens", "td_lora"),
         "MLP token routers (DyDiT SDT)": ("tokens",)}
SDT_PARTS = ("MLP token routers + TD-LoRA (DyDiT SDT)", "MLP token routers (DyDiT SDT)")  # left-out tokens skip the MLP only
WIDTH_PARTS = PART_LABELS
CUSTOM = "custom: the inputs above"
# The best recipes measured on the reference model (BENCHMARKS.md: teacher of all 15 photo classes, 16 Euler steps,
# cfg 2; PSNR against full compute at the FLOPs given): every knob the recipe set, on-policy steps included.
RECIPES: dict[str, dict[str, Any]] = {
    "width + TD-LoRA, 2 on-policy rounds (25.4 dB at 50 % FLOPs, 25 min)": dict(
        parts="width + TD-LoRA", width_parts="heads and MLP", target_flops=0.5, steps=300, seeds=4, experts=2, rank=4,
        on_policy_rounds=2, on_policy_steps=300),
    "coarse patches 12-82 %, 6 on-policy rounds (25.4 dB at 45 % FLOPs, 47 min)": dict(
        parts="coarse patches (DDiT)", coarse_schedule="12-82%:2", steps=900, seeds=8, rank=16, on_policy_rounds=6,
        on_policy_steps=450),
    "token routers + TD-LoRA (DiffCR; 19.9 dB at 50 % FLOPs, 15 min)": dict(
        parts="token routers + TD-LoRA (DiffCR)", target_flops=0.5, steps=600, seeds=4, experts=2, rank=4,
        on_policy_rounds=0),
}
RECIPE_INPUTS = sorted({name for recipe in RECIPES.values() for name in recipe})  # what a recipe decides


def with_recipe(recipe: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """The Train node's inputs with a measured recipe's settings in place of the ones it decides (custom: as given)."""
    if recipe == CUSTOM:
        return inputs
    if recipe not in RECIPES:
        raise ValueError(f"Train Dynamic DiT: recipe must be one of {', '.join([CUSTOM, *RECIPES])}, got '{recipe}'.")
    return {**inputs, **RECIPES[recipe]}


_NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def _conditioning_jobs(positive: list, negative: list) -> list[tuple[list, list]]:
    """One sampling job per positive conditioning entry (a batch of prompts trains on each), all with the negative."""
    if not positive:
        raise ValueError("Train Dynamic DiT: no positive conditioning; connect at least one prompt.")
    return [([entry], negative) for entry in positive]


def output_stem(filename: str) -> str:
    """models/dynamic_dit/<filename> (no suffix); refuses names that would leave the folder."""
    import folder_paths

    name = filename.strip()
    for suffix in (".safetensors", *(suffix[: -len(".safetensors")] for suffix in suffixes().values())):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    if not name or not _NAME.match(name) or ".." in name.split("/") or name.startswith("/"):
        raise ValueError(f"Train Dynamic DiT: filename '{filename}' must be a relative name of letters, digits, '_', '-', '.', '/'.")
    folders = folder_paths.get_folder_paths(MODEL_FOLDER)
    if not folders:
        raise ValueError("Train Dynamic DiT: ComfyUI has no models/dynamic_dit folder registered.")
    return os.path.join(folders[0], name)


@dataclass
class TrainingRequest:
    """A Train node's inputs, checked; `run` trains and writes the file."""

    model: Any
    spec: StudentSpec
    config: TrainConfig
    jobs: list
    latent: torch.Tensor  # one empty latent of the size to train at
    stem: str
    seeds: int
    on_policy_rounds: int
    on_policy_steps: int
    inputs: dict[str, Any]  # what the file's command line records
    sampling: dict[str, Any]  # the teacher's sampling runs: steps, cfg, sampler, scheduler
    text: PhaseText | None = None
    final_losses: list[float] = field(default_factory=list)  # the last training phase's loss per step, after `run`

    @property
    def learns_compute(self) -> bool:
        return any(part.learns_compute for part in self.spec.part_types())

    @classmethod
    def checked(cls, model, positive, negative, latent, parts, target_flops, steps, filename, width_parts, batch,
                learning_rate, experts, rank, coarse_schedule, gradient_checkpointing, on_policy_rounds, on_policy_steps,
                seeds, sampling: dict[str, Any]) -> "TrainingRequest":
        if parts not in PARTS or width_parts not in WIDTH_PARTS:
            raise ValueError(f"Train Dynamic DiT: parts must be one of {', '.join(PARTS)}; width parts one of {', '.join(WIDTH_PARTS)}.")
        spec = StudentSpec(parts=PARTS[parts], width_parts=WIDTH_PARTS[width_parts], experts=experts, rank=rank,
                           coarse_schedule=coarse_schedule, token_mode="sdt" if parts in SDT_PARTS else "diffcr")
        spec.validate()
        config = TrainConfig(target=target_flops, steps=steps, batch=batch, lr=learning_rate,
                             gradient_checkpointing=bool(gradient_checkpointing))
        config.validate()
        adapter_of(model)  # unsupported families are refused here
        jobs = _conditioning_jobs(positive, negative)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
            raise ValueError("Train Dynamic DiT: latent must be an image LATENT (B, C, H, W), e.g. from Empty Latent Image.")
        stem = output_stem(filename)
        if not 0 <= int(on_policy_rounds) <= 10:
            raise ValueError(f"Train Dynamic DiT: on_policy_rounds must be 0 to 10, got {on_policy_rounds}.")
        if int(on_policy_steps) < 0:
            raise ValueError(f"Train Dynamic DiT: on_policy_steps must be 0 (half the steps) or more, got {on_policy_steps}.")
        inputs = dict(parts=parts, width_parts=width_parts, target_flops=target_flops, steps=steps)
        inputs.update({"batch": batch, "lr": learning_rate, "experts": experts, "rank": rank})
        if not any(part.learns_compute for part in spec.part_types()):  # a schedule decides the FLOPs: say which
            inputs["coarse_schedule"] = coarse_schedule
        return cls(model, spec, config, jobs, torch.zeros_like(samples[:1]), stem, int(seeds), int(on_policy_rounds),
                   int(on_policy_steps), inputs, dict(sampling))

    def run(self, resume: bool, keep_checkpoints: bool, node_id: str | None) -> tuple[TrainResult, Any, int]:
        """Record the teacher, train, run the on-policy rounds, write the bundle; (the result, its path, the steps of
        each on-policy round). The model computes as before afterwards."""
        import comfy.utils

        from ..integration import training_host
        from ..training import export, trainer

        runs, round_steps = len(self.jobs) * self.seeds, training_host.round_steps_for(self.config.steps, self.on_policy_steps)
        total = runs + self.config.steps + self.on_policy_rounds * (runs + round_steps)
        progress = _Progress(comfy.utils.ProgressBar(total), PhaseText(node_id, total), total, runs)
        self.text = progress.text
        seeds = teacher_seeds(self.seeds)
        with training_host.model_left_as_found(self.model):  # the artist's model computes as before afterwards
            bank = training_host.record_trajectories(self.model, self.jobs, self.latent, seeds=seeds,
                                                     progress=lambda done, _: progress.teacher(done), **self.sampling)
            student = training_host.build_student(self.model, bank, self.spec)
            checkpoint = self.stem + ".ckpt"
            if not resume:
                training_host.remove_checkpoints(checkpoint)  # a fresh run; its checkpoints let a later run resume it
            result = trainer.train(student, bank, self.config, checkpoint=checkpoint,
                                   callback=lambda step, _, entry: progress.training(step, entry, count=self.config.steps))
            for index in range(self.on_policy_rounds):
                bank, result = self._on_policy_round(training_host, student, bank, index, round_steps, seeds, checkpoint, progress)
            command = "Train Dynamic DiT " + shlex.join(f"{k}={v}" for k, v in dict(
                **self.inputs, **{"sampling_steps": self.sampling["steps"], "cfg": self.sampling["cfg"],
                                  "sampler": self.sampling["sampler"], "scheduler": self.sampling["scheduler"]},
                seeds=self.seeds, prompts=len(self.jobs), on_policy_rounds=self.on_policy_rounds,
                on_policy_steps=round_steps).items())
            metadata = export.training_metadata(student, target=self.config.target,
                                                steps=self.config.steps + self.on_policy_rounds * round_steps, command=command,
                                                base_model=type(self.model.model).__name__,
                                                extra={"final_flops_ratio": f"{result.final_ratio:.4f}",
                                                       "eval_distill_loss": f"{result.eval_loss:.5f}"})
            progress.text.show("saving the file", force=True)
            path = export.save_bundle(student, self.stem, metadata)
            if not keep_checkpoints:  # a finished run needs them no more (an interrupted one keeps them to resume)
                training_host.remove_checkpoints(checkpoint)
        self.final_losses = progress.losses
        return result, path, round_steps

    def _on_policy_round(self, training_host, student, bank, index: int, round_steps: int, seeds: list[int],
                         checkpoint: str, progress: "_Progress"):
        runs = progress.runs
        base = runs + self.config.steps + index * (runs + round_steps)
        phase = f"on-policy round {index + 1}/{self.on_policy_rounds}"
        return training_host.on_policy_round(
            self.model, student, bank, self.jobs, self.latent, round_index=index, round_steps=round_steps,
            config=self.config, seeds=seeds, checkpoint=training_host.round_checkpoint(checkpoint, index),
            progress=lambda done, _: progress.teacher(done, phase, base),
            callback=lambda step, _, entry: progress.training(step, entry, f"{phase}, training", round_steps, base + runs),
            **self.sampling)


def still_falling(losses: list[float], share: float = 0.2, threshold: float = 0.05) -> float | None:
    """How much lower the mean distillation loss of the last `share` of the steps is than that of the share before
    it, when more than `threshold` (a run stopped while still learning); None when flat, rising or too short to say."""
    span = max(int(len(losses) * share), 5)
    if len(losses) < 2 * span:
        return None
    last, before = sum(losses[-span:]) / span, sum(losses[-2 * span:-span]) / span
    fall = 1.0 - last / before if before > 0 else 0.0
    return fall if fall > threshold else None


@dataclass
class _Progress:
    """The node's progress bar and phase text over the whole run."""

    bar: Any
    text: PhaseText
    total: int
    runs: int
    losses: list[float] = field(default_factory=list)  # the distillation loss per step of the latest training phase
    phase: str = ""

    def teacher(self, done: int, phase: str = "recording the teacher", base: int = 0) -> None:
        self.bar.update_absolute(base + done, self.total)
        self.text.show(f"{phase}: sampling run {done}/{self.runs}", base + done, force=done == self.runs)

    def training(self, step: int, entry: dict, phase: str = "training", count: int = 0, base: int | None = None) -> None:
        if phase != self.phase:
            self.phase, self.losses = phase, []
        self.losses.append(float(entry["distill"]))
        base = self.runs if base is None else base
        self.bar.update_absolute(base + step, self.total)
        self.text.show(f"{phase}: step {step}/{count}, distillation loss {entry['distill']:.4f}", base + step, force=step == count)


__all__ = ["CUSTOM", "PARTS", "RECIPES", "RECIPE_INPUTS", "SDT_PARTS", "TrainingRequest", "WIDTH_PARTS", "output_stem", "still_falling",
           "with_recipe"]
