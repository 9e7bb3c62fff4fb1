"""The trainer checks every model family runs (`test_trainer_wan.py`, `test_trainer_flux2.py`): the trainer works
through the adapter's capabilities alone, so the checks are the same and only the model and its sampling differ."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from support.training import sampling_through

from comfyui_dynamic_dit.integration import training_host
from comfyui_dynamic_dit.integration.patching import apply_settings, check_base_weights
from comfyui_dynamic_dit.methods.td_lora.comfy_files import apply_td_lora
from comfyui_dynamic_dit.core.files import header_metadata
from comfyui_dynamic_dit.methods.td_lora.file import load_td_lora_file
from comfyui_dynamic_dit.methods.token_router.runtime import TokenRouterSettings
from comfyui_dynamic_dit.methods.token_router.file import load_router_file
from comfyui_dynamic_dit.methods.width.settings import WidthSettings
from comfyui_dynamic_dit.methods.width.file import load_width_router
from comfyui_dynamic_dit.training.export import save_student, training_metadata
from comfyui_dynamic_dit.training.student import StudentSpec
from comfyui_dynamic_dit.training.trainer import TrainConfig, train

# sample(model) -> the final latent of the family's sampling run the test compares
Sample = Callable[[object], torch.Tensor]


def untrained_student_is_the_teacher_and_trains(model, bank, steps: int) -> None:
    student = training_host.build_student(model, bank, StudentSpec(experts=2, rank=2))
    batch = bank.fixed(4)
    with torch.no_grad():
        out, ratio = student(batch, noise=0.0)
    torch.testing.assert_close(out, batch["target"], rtol=0, atol=1e-5)
    assert torch.all(ratio > 1.0)  # full width plus the (zero) bypasses' FLOPs
    result = train(student, bank, TrainConfig(target=0.8, steps=steps, batch=2, checkpoint_every=1000), progress_bar=False)
    assert result.steps == steps and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def _matches_the_student(model, student, loaded, sample: Sample) -> None:
    reference = sample(sampling_through(model, student))
    assert (reference - sample(model)).abs().max() > 1e-3
    # float32 rounding scaled by the sample: an EPS model's random tiny stand-in (PixArt) ends its run at values of
    # ~7500 (x0 = x - sigma eps from sigma 157), where 1e-4 is below float32's resolution; the flow models end near 1
    torch.testing.assert_close(sample(loaded), reference, rtol=0, atol=1e-4 * max(1.0, float(reference.abs().max())))


def width_files_round_trip(model, bank, sample: Sample, folder: Path, base_model: str) -> None:
    """Thinned heads and MLP groups with non-zero bypasses: the loaded files, sliced by the executor, sample what the
    student's masked forward samples."""
    student = training_host.build_student(model, bank, StudentSpec(experts=2, rank=2), seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # drop some units at every step, give the bypasses weight
        student["width"].head_bias[:, ::2] = -5.0
        student["width"].group_bias[:, 1::2] = -5.0
        for up in student["td_lora"].bank.up.values():
            up.copy_(torch.randn(up.shape, generator=generator) * 0.02)
    paths = save_student(student, folder / "run", training_metadata(student, target=0.5, steps=0, command="test",
                                                                     base_model=base_model))
    for path in paths:
        check_base_weights(model, header_metadata(path), path.name)
    width = apply_settings(model, WidthSettings(router=load_width_router(paths[0])))
    loaded = apply_td_lora(width, load_td_lora_file(paths[1]), 1.0)
    _matches_the_student(model, student, loaded, sample)


def token_router_file_round_trips(model, bank, sample: Sample, folder: Path, base_model: str, mode: str) -> str:
    """Token routers with keep ratios below 1: the file run 'as trained' by the Token Router samples what the
    student's forward samples. Returns the file's router kind."""
    spec = StudentSpec(parts=("tokens",), token_mode=mode, ratio_regions=2)
    student = training_host.build_student(model, bank, spec, seed=1)
    with torch.no_grad():
        student["tokens"].ratio.copy_(torch.tensor([[0.5], [0.75]]).expand_as(student["tokens"].ratio))
    [path] = save_student(student, folder / "run", training_metadata(student, target=0.8, steps=0, command="test",
                                                                     base_model=base_model))
    router = load_router_file(path)
    _matches_the_student(model, student, apply_settings(model, TokenRouterSettings.as_trained(router)), sample)
    return router.router
