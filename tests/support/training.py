"""Shared pieces of the trainer tests: the tiny teacher runs' settings and a student builder."""
from __future__ import annotations

import comfy.patcher_extension
import torch

from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.integration.patch_points import with_patch_points
from comfyui_dynamic_dit.integration.patching import adapter_of, bind_model_call
from comfyui_dynamic_dit.training.student import StudentSpec

LATENT = torch.zeros(1, 16, 16, 16)  # 8x8 = 64 image tokens
SAMPLING = dict(steps=8, cfg=2.0, sampler="euler", scheduler="simple")


def student_for(model, bank, seed: int = 0, **spec):
    return training_host.build_student(model, bank, StudentSpec(**spec), seed=seed)


def sampling_through(model, student, only_timesteps=None):
    """A clone of `model` whose diffusion-model calls run the student's training forward (deterministic gates),
    at every call or only at the timesteps given (the others run the model itself). Any family: the call's
    tensor arguments are bound by the names of the model's public forward, as the recorder binds them."""

    def student_call(executor, *args, **kwargs):
        bound = bind_model_call(executor, args, kwargs).arguments
        flat = {**{k: v for k, v in bound.items() if k != "kwargs"}, **bound.get("kwargs", {})}
        options = flat.pop("transformer_options", None) or {}
        inputs = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
        if only_timesteps is not None and not any(
                abs(float(student.timestep(inputs).reshape(-1)[0]) - t) < 1e-6 for t in only_timesteps):
            return executor(*args, **kwargs)
        sigmas = options["sigmas"].reshape(-1).float().repeat(student.latent(inputs).shape[0] // options["sigmas"].numel())
        with torch.no_grad():
            return student({**inputs, "sigmas": sigmas}, noise=0.0)[0]

    wrapped = with_patch_points(model, adapter_of(model))  # SD3: the wrapper point its forward lacks
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "test", student_call)
    return wrapped
