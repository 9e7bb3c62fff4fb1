"""The contracts a method fills, and the registries the executor and the trainer read.

A method is frozen `MethodSettings` (what a node sets, carried by the plan), a `DynamicMethod` runtime created
fresh for every sampling run, and, where it learns something, a `TrainablePart` of the trainer's student. The
executor and the student call their hooks in one canonical order (`order`, lower runs outside), so the order in
which nodes were chained never changes the result.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from ..families import BlockInternals, BlockRef
from .plan import MethodSettings

if TYPE_CHECKING:
    from ..training.student import DynamicStudent, StudentCall, StudentSpec
    from ..training.trajectories import Trajectories
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


# --- the trainer's side ----------------------------------------------------------------------------
class LinearPieces:
    """What the parts do to one host linear in a student's block call (`training.adapted_linear` applies them):
    a keep mask of its input columns, low-rank bypasses with their per-sample column gates, and per-token weights
    of an MLP update while an SDT call runs."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.bypasses: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]] = []
        self.token_weights: Callable[[], Any] | None = None


class TrainablePart(torch.nn.Module):
    """A method's trainable part inside the trainer's student (the frozen host model is the student's).

    The student runs the host's blocks and asks each part, in `order`, what it does to a call, a block call and a
    linear, the way the executor asks the runtimes; a part that changes how a whole call runs (coarse patches,
    rows grouped by timestep region) takes the call in `forward_call`.
    """

    part: ClassVar[str]  # the trainer's name of the part ("width", "td_lora", ...)
    order: ClassVar[int]  # hook and construction order (lower first)
    learns_compute: ClassVar[bool] = False  # whether training decides its FLOPs (the compute term applies)
    trains_alone: ClassVar[bool] = False  # a part no other part trains beside
    not_with: ClassVar[tuple[str, ...]] = ()  # parts it is not trained beside, and why (`refusal`)
    refusal: ClassVar[str] = ""
    file_suffix: ClassVar[str]  # a run's part file: <stem><suffix>
    spec_fields: ClassVar[tuple[str, ...]] = ()  # the settings of a training run (StudentSpec) this part reads

    @classmethod
    def check(cls, spec: "StudentSpec") -> None:
        """Raise ValueError for settings of `spec` this part cannot train with (before any model is touched)."""

    def check_training(self, config: Any) -> None:
        """Raise ValueError for trainer settings (`training.trainer.TrainConfig`) this part cannot train with."""

    def prepare(self, call: "StudentCall") -> None:
        """The decisions of a call (or of a group of its rows), written into `call.decisions`."""

    def forward_call(self, student: "DynamicStudent", call: "StudentCall") -> tuple[torch.Tensor, torch.Tensor] | None:
        """The call's output and (B,) FLOPs ratios when this part runs the call its own way, else None."""
        return None

    def linears(self, block: BlockRef) -> tuple[str, ...]:
        """Names of block `block`'s linears this part adapts."""
        return ()

    def adapt_linear(self, call: "StudentCall", position: int, block: BlockRef, name: str, layer: torch.nn.Module,
                     pieces: LinearPieces) -> None:
        """Add this part's piece of the block's linear `name` (a mask, a bypass, token weights) for the block call."""

    def enter_block(self, call: "StudentCall", position: int) -> None:
        """Per-block decisions (into `call.decisions`, where gradient checkpointing finds them) before a block call."""

    def wrap_block(self, call: "StudentCall", position: int, block: BlockRef, args: BlockArgs, run: BlockFn,
                   training: bool) -> dict:
        return run(args)

    def after_block(self, call: "StudentCall", position: int, block: BlockRef, args: BlockArgs, out: dict) -> None:
        """Read a block's output (e.g. what a trained de-embedding reads after the last block)."""

    def extra_flops(self, block: BlockRef, work: Any) -> float:
        """FLOPs this part adds to a block call of `work` (e.g. a bypass, whose sizes follow the kept width)."""
        return 0.0

    def call_ratio(self, student: "DynamicStudent", call: "StudentCall") -> torch.Tensor | None:
        """(B,) FLOPs ratios of a call the student runs, where this part decides them (differentiably), else None."""
        return None

    def run_ratio(self, student: "DynamicStudent", bank: "Trajectories", **decision: Any) -> Any:
        """The FLOPs ratio of a sampling run of the bank's schedule, where this part decides it, else None."""
        return None

    def training_rows(self, bank: "Trajectories") -> "Trajectories":
        """The rows this part learns from (the calls it changes)."""
        return bank

    def changed_timesteps(self, bank: "Trajectories") -> list[float] | None:
        """Timesteps of the bank's schedule whose calls this part changes, None for every call."""
        return None

    def decision_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that decide compute (routers, keep ratios): the trainer gives them their own learning rate."""
        return []

    def after_step(self) -> None:
        """After an optimiser step (e.g. keep parameters in their range)."""

    def output_anchor(self) -> torch.Tensor | float:
        """0, with a gradient path to parameters a step may leave out of the graph (DDP refuses unused ones)."""
        return 0.0

    def metadata(self) -> dict[str, str]:
        """This part's fields of the run's training metadata."""
        return {}

    def save(self, student: "DynamicStudent", path: Any, metadata: dict[str, str]) -> None:
        """Write this part as its method's file at `path` (what the method's loader reads)."""
        raise NotImplementedError


PARTS: dict[str, type[TrainablePart]] = {}


def register_part(part_type: type[TrainablePart]) -> type[TrainablePart]:
    if part_type.part in PARTS and PARTS[part_type.part] is not part_type:
        raise ValueError(f"two trainable parts claim the name '{part_type.part}'")
    PARTS[part_type.part] = part_type
    return part_type
