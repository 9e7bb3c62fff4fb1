"""Gradient checkpointing of one block call through host blocks that write into their inputs."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping

import torch
import torch.utils.checkpoint


def checkpointed(block_call: Callable[[Mapping[str, Any]], dict], args: Mapping[str, Any],
                 decisions: dict[str, torch.Tensor | None],
                 host_training: Callable[[], contextlib.AbstractContextManager]) -> dict:
    """`block_call(args)` keeping only its inputs for backward, which recomputes the rest (gradient checkpointing).

    Reentrant checkpointing: the forward runs without autograd and backward reruns it with autograd under the
    trainer's mutation context, so the host's in-place adds are handled as in any training step. (Non-reentrant
    checkpointing keeps recomputed tensors by reference, and the block's later in-place adds change them before
    backward reads them: wrong gradients.) Everything with a gradient from outside the block enters as an input:
    the block's tensor arguments (copied, since a rerun must see them unchanged; the host's blocks write into
    them) and `decisions` (width gates, TD-LoRA gates, keep ratio; swapped in place for the call). The trainable
    parameters inside are leaves, which the rerun's backward reaches directly. The rerun happens in backward,
    outside the student's forward, so it enters the host's training mode itself."""
    names = [name for name, value in args.items() if isinstance(value, torch.Tensor)]
    chosen = [name for name, value in decisions.items() if value is not None]
    keys: list[str] = []

    def run(_anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs, swapped = tensors[:len(names)], tensors[len(names):]
        outside = dict(decisions)
        decisions.update(zip(chosen, swapped))
        try:
            with host_training():
                out = block_call({**args, **{name: t.clone() for name, t in zip(names, inputs)}})
        finally:
            decisions.update(outside)
        keys[:] = list(out)
        return tuple(out[key] for key in keys)

    # an input that requires grad: reentrant checkpointing runs backward only then, and the first block's
    # inputs may need none
    anchor = torch.zeros((), requires_grad=True)
    values = torch.utils.checkpoint.checkpoint(run, anchor, *(args[name] for name in names),
                                               *(decisions[name] for name in chosen), use_reentrant=True)
    return dict(zip(keys, values))


__all__ = ["checkpointed"]
