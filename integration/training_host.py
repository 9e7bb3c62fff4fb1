"""The trainer in ComfyUI: record the teacher's trajectories with the host's own sampler, prepare the
frozen model for autograd, and build the student. Runtime, not developer tooling: the "Train Dynamic
DiT" node uses it, and so does the CLI (`python -m devtools.train`)."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from ..families import ModelAdapter
from ..methods.td_lora.runtime import per_sample_sigmas
from ..training.student import DynamicStudent, StudentSpec
from ..training.trainer import TrainConfig, TrainResult, train
from ..training.trajectories import Trajectories, detached, rollout_seeds, step_index
from .autograd_paths import differentiable_host
from .patch_points import emulated_patch_points, with_patch_points
from .patching import adapter_of, bind_model_call, diffusion_model_of, sigma_to_percent

RECORD_KEY = "dynamic_dit.train_record"


def _recorder(adapter: ModelAdapter, bank: Trajectories, follow: Callable[[dict], torch.Tensor | None] | None = None) -> Callable:
    """A DIFFUSION_MODEL wrapper that records every call's tensor arguments and output into `bank`. With
    `follow`, the sampler continues from `follow(row inputs)` where it gives an output (the student's: the
    rows are then the states the student visits, still with the teacher's output as the target)."""
    def wrapper(executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = bind_model_call(executor, args, kwargs).arguments
        arguments = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
        options = arguments.pop("transformer_options", None) or {}
        batch = arguments[bank.latent_argument].shape[0]
        for name in adapter.scalar_arguments:  # numbers the student must replay: one value per sample in the rows
            if isinstance(arguments.get(name), (int, float)) and not isinstance(arguments[name], bool):
                arguments[name] = torch.full((batch,), float(arguments[name]))
        # Anything but tensors (a ControlNet, Kontext reference latents, ...) the student could not replay
        derived = adapter.derived_arguments({k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)})
        unsupported = sorted(k for k, v in arguments.items()
                             if v is not None and not isinstance(v, torch.Tensor) and not (k in derived and derived[k] == v))
        if unsupported:
            raise ValueError(
                f"Train Dynamic DiT: the teacher's model calls carry {', '.join(repr(k) for k in unsupported)} (e.g. Kontext "
                "reference images or a ControlNet); the trainer records tensor inputs only. Train without them."
            )
        record = {k: detached(v) for k, v in arguments.items()
                  if v is not None and (k not in derived or k in adapter.scalar_arguments)}
        out = executor(*args, **kwargs)
        latent = record[bank.latent_argument]
        sigmas = per_sample_sigmas({"transformer_options": options}, latent.shape[0], math.nan)
        if torch.isnan(sigmas).any():
            sigmas = record[bank.timestep_argument].reshape(-1).float()
        bank.add_call(record, sigmas, detached(out))
        if follow is not None:
            followed = follow({**record, "sigmas": sigmas})
            if followed is not None:
                return followed.to(out)
        return out

    return wrapper


def record_trajectories(model_patcher: Any, jobs: Sequence[tuple[list, list]], latent: torch.Tensor, *, steps: int, cfg: float,
                        sampler: str, scheduler: str, seeds: Sequence[int],
                        progress: Callable[[int, int], None] | None = None,
                        follow: Callable[[dict], torch.Tensor | None] | None = None) -> Trajectories:
    """Full-compute sampling runs of the frozen model, one per (positive, negative) job and seed, with every
    diffusion-model call recorded (x_i, timestep, conditioning, the teacher's output) on the model's own
    sampler schedule."""
    if not jobs:
        raise ValueError("Train Dynamic DiT: no conditioning given; the trainer needs at least one prompt to distil on.")
    adapter = adapter_of(model_patcher)  # unsupported models are refused before any sampling
    bank = Trajectories(adapter.latent_argument, adapter.timestep_argument)
    recording = with_patch_points(model_patcher, adapter)  # SD3: the wrapper point its forward lacks
    recording.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, RECORD_KEY, _recorder(adapter, bank, follow))
    total, done = len(jobs) * len(seeds), 0
    for positive, negative in jobs:
        for seed in seeds:
            noise = comfy.sample.prepare_noise(latent, seed)
            comfy.sample.sample(recording, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                disable_pbar=True, seed=seed)
            done += 1
            if progress is not None:
                progress(done, total)
    return bank


def normal_parameters(module: torch.nn.Module) -> int:
    """Replace inference-mode parameters and buffers (ComfyUI loads models under torch.inference_mode())
    by normal copies, which autograd can save; returns how many were replaced. Same values, so the
    model computes exactly as before."""
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is not None and param.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(param.clone(), requires_grad=False)
                    replaced += 1
            for name, buffer in list(sub._buffers.items()):
                if buffer is not None and buffer.is_inference():
                    sub._buffers[name] = buffer.clone()
                    replaced += 1
    return replaced


@contextlib.contextmanager
def model_left_as_found(model_patcher: Any) -> Iterator[None]:
    """Training freezes the connected model (`prepare_model`); afterwards each parameter requires grad again exactly
    where it did before. The flag is not only about autograd: for a non-contiguous input PyTorch's matmul picks
    another kernel when the weight requires grad, so a model left frozen would compute its next images with other
    last digits than before training (on some CPUs), although nothing the artist chose had changed."""
    diffusion_model = diffusion_model_of(model_patcher)
    trainable = {name for name, param in diffusion_model.named_parameters() if param.requires_grad}
    try:
        yield
    finally:
        for name, param in diffusion_model.named_parameters():  # the same names, maybe new (normal) tensors
            param.requires_grad_(name in trainable)


def prepare_model(model_patcher: Any) -> tuple[ModelAdapter, torch.nn.Module, torch.device]:
    """The adapter (refusing unsupported models), the loaded frozen diffusion model and its device (run the
    training inside `model_left_as_found`)."""
    adapter = adapter_of(model_patcher)
    comfy.model_management.load_models_gpu([model_patcher])
    diffusion_model = diffusion_model_of(model_patcher)
    diffusion_model.requires_grad_(False)
    normal_parameters(diffusion_model)
    return adapter, diffusion_model, torch.device(model_patcher.load_device)


def feature_statistics(adapter: ModelAdapter, diffusion_model: torch.nn.Module, timesteps: Sequence[float],
                       dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, float]:
    """Mean and scale of the router features over the schedule's timesteps (the routers learn on
    normalised features; the export folds the normalisation back into the file's weights)."""
    units = adapter.width_units()
    if units is None:  # no router to feed: a neutral normalisation
        return torch.zeros(adapter.model_info().hidden_size), 1.0
    with torch.inference_mode(False), torch.no_grad():  # this order: inference_mode(False) turns grad mode back on
        values = torch.tensor(list(timesteps), dtype=torch.float32, device=device)
        features = units.timestep_features(diffusion_model, values, dtype).float()
        mean = features.mean(0)
        scale = float((features - mean).pow(2).mean().sqrt().clamp_min(1e-6)) if len(timesteps) > 1 else 1.0
    return mean.cpu(), scale


def student_follower(student: DynamicStudent, bank: Trajectories) -> Callable[[dict], torch.Tensor | None]:
    """`follow` for `record_trajectories`: the student's output (deterministic decisions) for the calls it changes,
    the coarse steps of its schedule or every call, so a sampling run visits the states the student leads to."""
    timesteps = student.changed_timesteps(bank)

    def follow(inputs: dict) -> torch.Tensor | None:
        t = float(inputs[bank.timestep_argument].reshape(-1)[0])
        if timesteps is not None and step_index(t, timesteps) is None:
            return None
        with torch.inference_mode(False), torch.no_grad():  # this order: inference_mode(False) turns grad mode back on
            return student(inputs, noise=0.0)[0]

    return follow


def round_steps_for(steps: int, requested: int = 0) -> int:
    """Training steps of one on-policy round: `requested`, or by default half the main run's steps."""
    return requested or max(1, steps // 2)


def round_checkpoint(checkpoint: str | os.PathLike | None, round_index: int) -> Path | None:
    """The checkpoint of on-policy round `round_index` (from 0), beside the run's: `<name>.round<k>.ckpt`."""
    if checkpoint is None:
        return None
    path = Path(checkpoint)
    return path.with_name(f"{path.stem}.round{round_index + 1}{path.suffix}")


def remove_checkpoints(checkpoint: str | os.PathLike) -> None:
    """A fresh run: the run's checkpoint and its rounds' go (a resumed run would continue them)."""
    path = Path(checkpoint)
    for found in (path, *path.parent.glob(f"{path.stem}.round*{path.suffix}")):
        found.unlink(missing_ok=True)


def on_policy_round(model_patcher: Any, student: DynamicStudent, bank: Trajectories, jobs: Sequence[tuple[list, list]],
                    latent: torch.Tensor, *, round_index: int, round_steps: int, config: TrainConfig, steps: int, cfg: float,
                    sampler: str, scheduler: str, seeds: Sequence[int],
                    progress: Callable[[int, int], None] | None = None,
                    callback: Callable[[int, int, dict[str, float]], None] | None = None,
                    log: Callable[[str], None] | None = None,
                    checkpoint: str | os.PathLike | None = None) -> tuple[Trajectories, TrainResult]:
    """One round of on-policy refinement after training (DAgger): the prompts are sampled again with the
    student making its calls (`student_follower`), the states it visits are recorded with the full model's
    output as the target and added to the rows, and training goes on `round_steps` steps on everything, at the
    target FLOPs from the start. Teacher-forced rows alone never show the student the states its own errors
    lead to, and over the many coarse steps of a DDiT schedule those errors add up. Rollout seeds are the
    teacher's moved by a stride per round (`rollout_seeds`, `round_index` from 0). With `checkpoint`
    (`round_checkpoint` of the run's) the round's training saves and resumes like the main run's: a resumed run
    samples the finished rounds' rollouts again (the same rows: the student at each round's start is the previous
    checkpoint's, the seeds are fixed) and continues the round it stopped in. Returns the rows and the round's result."""
    rollouts = record_trajectories(model_patcher, jobs, latent, steps=steps, cfg=cfg, sampler=sampler, scheduler=scheduler,
                                   seeds=rollout_seeds(seeds, round_index), progress=progress,
                                   follow=student_follower(student, bank))
    bank = bank.extended(rollouts)
    result = train(student, bank, replace(config, steps=round_steps, hold=0, warmup=0), progress_bar=False, log=log,
                   callback=callback, checkpoint=checkpoint)
    if log is not None:
        log(f"on-policy round {round_index + 1}: {bank.rows} rows, distillation loss {result.eval_loss:.4f}")
    return bank, result


def student_host(adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """The context the student calls the host's model in: stand-ins for kernels without a backward (autograd_paths)
    and the block patch points a family's host lacks (patch_points; Z-Image), both put back afterwards."""
    kernels = differentiable_host(diffusion_model)

    @contextlib.contextmanager
    def host() -> Iterator[None]:
        with kernels(), emulated_patch_points(diffusion_model, adapter):
            yield

    host.swaps = kernels.swaps  # what the kernel probe found, for the log and the tests
    return host


def build_student(model_patcher: Any, bank: Trajectories, spec: StudentSpec, seed: int = 0) -> DynamicStudent:
    adapter, diffusion_model, device = prepare_model(model_patcher)
    mean, scale = feature_statistics(adapter, diffusion_model, bank.timesteps, bank.dtype, device)
    with torch.inference_mode(False):
        return DynamicStudent(adapter, diffusion_model, spec, mean, scale, seed=seed,
                              sigma_percent=sigma_to_percent(model_patcher.model.model_sampling),
                              host_training=student_host(adapter, diffusion_model)).to(device)


__all__ = ["build_student", "feature_statistics", "model_left_as_found", "normal_parameters",
           "on_policy_round", "prepare_model",
           "record_trajectories", "remove_checkpoints", "round_checkpoint", "round_steps_for", "student_follower"]
