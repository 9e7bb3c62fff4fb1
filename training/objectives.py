"""What the self-distillation trainer optimises: the distillation loss, the compute term, and the
straight-through Gumbel-sigmoid gates that make hard keep/drop decisions trainable.

The compute term is DyDiT's / DiffCR's: lambda * (FLOPs ratio - target)^2, where the FLOPs ratio is the
differentiable expected share of the full model's FLOPs the student executes. The target starts at
full compute and is warmed down to the user's target, so training starts from the teacher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gumbel_sigmoid(logits: torch.Tensor, temperature: float, hard: bool = True, generator: torch.Generator | None = None,
                   noise: bool = True) -> torch.Tensor:
    """A keep gate in [0, 1] per logit: sigmoid((logit + logistic noise) / temperature); with `hard`, the
    forward value is the 0/1 decision (gate > 0.5) and the gradient is the soft gate's (straight-through).
    Without `noise` it is the deterministic gate inference uses (keep where logit > 0)."""
    if noise:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device if generator is None else "cpu")
        uniform = uniform.to(logits.device).clamp(1e-6, 1 - 1e-6)
        logits = logits + torch.log(uniform) - torch.log1p(-uniform)
    soft = torch.sigmoid(logits / temperature)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) + soft - soft.detach()


@dataclass(frozen=True)
class ComputeTarget:
    """The FLOPs target over training: full compute (1.0) for `hold` steps, then a cosine warm-down to
    `target` over `warmup` steps (DyDiT warms lambda's target from 1 down over 1k-5k iterations)."""

    target: float
    warmup: int
    hold: int = 0
    weight: float = 2.0  # lambda

    def at(self, step: int) -> float:
        if step < self.hold:
            return 1.0
        progress = min(1.0, (step - self.hold) / self.warmup) if self.warmup > 0 else 1.0  # 0: at the target from the start
        return self.target + (1.0 - self.target) * 0.5 * (1.0 + math.cos(math.pi * progress))


def feature_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per-block hidden-state distillation, each block's error relative to the teacher's scale."""
    if not student:
        return torch.zeros(())
    terms = [F.mse_loss(s.float(), t.float()) / (t.float().pow(2).mean() + 1e-6) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
