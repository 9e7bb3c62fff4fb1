"""Shared pieces of the trainer tests: the tiny teacher runs' settings and a student builder."""
from __future__ import annotations

import torch

from comfyui_dynamic_dit.dynamic_core.comfy_integration import training_host
from comfyui_dynamic_dit.dynamic_core.training.student import StudentSpec

LATENT = torch.zeros(1, 16, 16, 16)  # 8x8 = 64 image tokens
SAMPLING = dict(steps=8, cfg=2.0, sampler="euler", scheduler="simple")


def student_for(model, bank, seed: int = 0, **spec):
    return training_host.build_student(model, bank, StudentSpec(**spec), seed=seed)
