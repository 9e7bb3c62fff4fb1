"""Gradient checkpointing of the student's blocks (training/checkpointing.py) on the tiny Flux."""
from __future__ import annotations

import pytest
import torch
from support.training import student_for

from comfyui_dynamic_dit.training.mutation import mutation_context


@pytest.mark.parametrize("parts", [("width", "td_lora"), ("tokens", "td_lora"), ("coarse",)])
def test_gradient_checkpointing_gives_the_same_gradients(flux_model, bank, parts):
    """Recomputing every block in backward (its inputs copied, since the host's blocks write into them) changes
    memory, never the gradients."""
    batch = bank.fixed(4)
    grads = []
    for checkpointing in (False, True):
        student = student_for(flux_model, bank, parts=parts)
        with torch.no_grad():  # away from the start, where some parts have no gradient yet
            for name, param in student.named_parameters():
                if name.startswith("parts.td_lora.bank.up"):
                    param.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
            if "tokens" in student.parts:
                student["tokens"].ratio.fill_(0.63)
        student.gradient_checkpointing = checkpointing
        with mutation_context("allow"):
            out, ratios = student(batch, noise=1.0, generator=torch.Generator().manual_seed(0))
            ((out - batch["target"]).pow(2).mean() + ratios.mean()).backward()
        grads.append({name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8, msg=lambda m, name=name: f"{name}: {m}")
