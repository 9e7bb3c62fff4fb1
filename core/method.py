"""The interface every dynamic method implements, and the registry the executor reads.

A method is a pair: frozen `MethodSettings` (what a node sets, carried by the plan) and a
`DynamicMethod` runtime created fresh for every sampling run. The executor calls the runtime's
hooks in a fixed canonical order (`order`, lower runs outside), so the order in which the nodes
were chained never changes the result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..families import BlockInternals, BlockRef
from .plan import MethodSettings

if TYPE_CHECKING:
    from .executor import CallState, ModelCall, RunContext

BlockArgs = dict[str, Any]
BlockFn = Callable[[BlockArgs], dict]


class DynamicMethod:
    settings_type: ClassVar[type[MethodSettings]]
    order: ClassVar[int]  # model-level and block-level hooks nest by this; lower is outer

    def __init__(self, settings: MethodSettings, run: "RunContext") -> None:
        self.settings = settings
        self.run = run

    @property
    def name(self) -> str:
        return self.settings.method

    def on_step(self, step: int, latent: torch.Tensor) -> None:
        """Called once per sampling step, from the sampler's callback, with the step's latent.

        The callback fires after the step's first model evaluation; `latent` is the sampler's x at
        the start of step `step` (the latents of consecutive calls form the denoising trajectory).
        """

    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        """Model-level work around one diffusion-model call (e.g. a coarser patch grid)."""
        return proceed(model_call)

    def wrap_block(self, call: "CallState", block: BlockRef, args: BlockArgs, proceed: BlockFn) -> dict:
        """Block-level work around one block call (e.g. routing a subset of tokens through it)."""
        return proceed(args)

    def block_internals(
        self, call: "CallState", block: BlockRef, args: BlockArgs, internals: BlockInternals
    ) -> BlockInternals:
        """Reductions inside the block (heads, MLP groups, MLP tokens, linear extras) for this call.

        `args` are the arguments the block will actually run on (after any token routing).
        Return `internals` unchanged to leave the block alone.
        """
        return internals

    def finish(self) -> None:
        """Called when the sampling run ends, also after an error; drop per-run caches here."""


REGISTRY: dict[str, type[DynamicMethod]] = {}


def register(method_type: type[DynamicMethod]) -> type[DynamicMethod]:
    name = method_type.settings_type.method
    if name in REGISTRY and REGISTRY[name] is not method_type:
        raise ValueError(f"two dynamic methods claim the name '{name}'")
    REGISTRY[name] = method_type
    return method_type
