"""Training on any host: kernels without a backward formula (ComfyUI 0.12.1's comfy-kitchen RoPE) are found by a
probe and replaced by plain PyTorch in the student's forward only."""
import pytest
import torch

import comfy.ldm.flux.math

from comfyui_dynamic_dit.integration.autograd_paths import (
    differentiable_host,
    has_backward,
    kernels_without_backward,
    rope,
    rope1,
)
from comfyui_dynamic_dit.training.trainer import distillation
from comfyui_dynamic_dit.training.mutation import mutation_context

from support.training import student_for


@torch.library.custom_op("dynamic_dit_test::fused_rope", mutates_args=())
def fused_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused kernel as comfy-kitchen registers one: a custom op with no autograd formula."""
    q, k = rope(xq, xk, freqs_cis)
    return q.clone(), k.clone()


def host_kernel(xq, xk, freqs_cis):
    return fused_rope(xq, xk, freqs_cis)


def student_loss_gradients(flux_model, bank):
    student = student_for(flux_model, bank)
    with torch.inference_mode(False), torch.enable_grad(), mutation_context("allow"):  # as the trainer's step runs
        batch = bank.fixed(2)
        out, _ = student(batch, noise=0.0)
        distillation(out, batch["target"]).backward()
    return student, [p.grad.clone() for p in student.parameters() if p.grad is not None]


def test_the_probe_tells_kernels_with_and_without_backward():
    assert not has_backward("apply_rope", host_kernel)
    assert has_backward("apply_rope", rope) and has_backward("apply_rope1", rope1)
    assert has_backward("apply_rope1", lambda x, freqs: 1 / 0)  # fails in forward: cannot tell, left alone


def test_the_stand_in_computes_the_hosts_rope():
    g = torch.Generator().manual_seed(1)
    x, freqs = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 1, 5, 4, 2, 2, generator=g)
    torch.testing.assert_close(rope1(x, freqs), comfy.ldm.flux.math.apply_rope1(x, freqs), rtol=0, atol=1e-6)


def test_a_kernel_without_backward_is_replaced_in_the_students_forward_only(flux_model, bank, monkeypatch):
    monkeypatch.setattr(comfy.ldm.flux.math, "apply_rope", rope)  # a host whose RoPE has a backward
    monkeypatch.setattr(comfy.ldm.flux.math, "apply_rope1", rope1)
    assert kernels_without_backward(flux_model.model.diffusion_model) == []
    _, expected = student_loss_gradients(flux_model, bank)

    monkeypatch.setattr(comfy.ldm.flux.math, "apply_rope", host_kernel)  # a host whose fused RoPE has none
    assert [str(s) for s in differentiable_host(flux_model.model.diffusion_model).swaps] == ["comfy.ldm.flux.math.apply_rope"]
    student, got = student_loss_gradients(flux_model, bank)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    assert comfy.ldm.flux.math.apply_rope is host_kernel  # put back after the forward: sampling keeps the host's kernel


def test_without_the_stand_in_the_student_cannot_train(flux_model, bank, monkeypatch):
    """The failure the stand-in exists for (ComfyUI 0.12.1: 'no autograd formula was registered')."""
    monkeypatch.setattr(comfy.ldm.flux.math, "apply_rope", host_kernel)
    from comfyui_dynamic_dit.integration import autograd_paths

    monkeypatch.setattr(autograd_paths, "has_backward", lambda name, kernel: True)  # a probe that finds nothing
    with pytest.raises(RuntimeError, match="autograd"):
        student_loss_gradients(flux_model, bank)
