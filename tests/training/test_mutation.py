"""Autograd through in-place writes into saved tensors: the trainer's "allow" mode copies a saved tensor just
before a write and never takes one tensor for another; "clone" copies everything. Both give the gradients
of the same computation done without any in-place write."""
from __future__ import annotations

import gc

import pytest
import torch

from comfyui_dynamic_dit.training.mutation import mutation_context


def block_with_inplace_update(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """As ComfyUI's blocks do: an op saves x, then x is updated in place (`img += ...`)."""
    y = x * weight  # saves x and weight
    x += torch.tanh(y)  # writes into the saved x
    return x


def reference(x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x0 + torch.tanh(x0 * weight)


@pytest.mark.parametrize("mode", ["allow", "clone"])
def test_gradients_through_a_write_into_a_saved_tensor_are_right(mode):
    weight = torch.randn(5, requires_grad=True)
    x0 = torch.randn(3, 5)
    with mutation_context(mode):
        out = block_with_inplace_update(x0.clone(), weight)
        out.pow(2).sum().backward()
    got = weight.grad.clone()
    weight.grad = None
    reference(x0, weight).pow(2).sum().backward()
    torch.testing.assert_close(got, weight.grad)


def test_without_the_context_autograd_refuses_the_write():
    weight = torch.randn(5, requires_grad=True)
    out = block_with_inplace_update(torch.randn(3, 5), weight)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_a_write_through_a_view_copies_the_saved_tensor():
    weight = torch.randn(4, requires_grad=True)
    x0 = torch.randn(2, 4)
    with mutation_context("allow"):
        x = x0.clone()
        y = (x * weight).sum()  # saves x
        x[0].mul_(10.0)  # writes into x's storage through a view
        y.backward()
    torch.testing.assert_close(weight.grad, x0.sum(0))


def test_freed_and_reused_tensors_are_never_mistaken_for_one_another():
    """torch's allow_mutation_on_saved_tensors finds a saved tensor by (id, data pointer, version): a new tensor
    where a mutated, freed one lived is taken for it. Here many saved-then-mutated tensors of one shape are freed
    while their graphs live, so addresses and ids come back; every gradient must still be its own."""
    weight = torch.ones(64, requires_grad=True)

    def call(scale: float) -> torch.Tensor:
        t = torch.full((64,), scale) * weight  # fresh tensor, version 0
        out = (t * t).sum()  # saves t
        t.add_(1.0)  # written after being saved; t is freed on return
        return out

    with mutation_context("allow"):
        outs = []
        for i in range(64):
            outs.append(call(float(i % 5 + 1)))
            gc.collect(0)  # the young objects: what reuses the freed tensors' memory (a full collection of the suite's
            # heap took 0.3 s a call and reused no more: 62 of 64 data pointers distinct either way)
        for i, out in enumerate(outs):
            weight.grad = None
            out.backward(retain_graph=True)
            scale = float(i % 5 + 1)
            torch.testing.assert_close(weight.grad, torch.full((64,), 2 * scale * scale), msg=f"call {i}")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mutation must be one of allow, clone"):
        mutation_context("copy")
