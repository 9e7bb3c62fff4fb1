"""The model-adapter seam: what the executor and the methods need to know about a DiT family.

An adapter describes one model family (Flux now; Wan and MMDiT later): which blocks exist and how
ComfyUI addresses them, how image and text tokens are laid out in each block's inputs, where the
heads and MLP channels live, and the analytic FLOPs of every part. Adapters never import ComfyUI;
they inspect the `torch.nn.Module` the host built.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from ..flops import FlopBreakdown
from ..slicing import LinearExtra, RunIndexCache, WeightSource

if TYPE_CHECKING:
    from .coarse import CoarseGrid


class UnsupportedModelError(ValueError):
    """The model is not a family (or variant) this pack knows how to patch safely."""


@dataclass(frozen=True, order=True)
class BlockRef:
    """One transformer block, e.g. the 3rd double-stream block of Flux."""

    kind: str  # family specific, e.g. "double" / "single"
    index: int

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.index}"


@dataclass(frozen=True)
class CallShape:
    """Token counts of one model call, as the unpatched model would see them."""

    batch: int
    image_tokens: int  # includes reference-image tokens (Kontext) that join the image stream
    text_tokens: int
    guidance: bool = False  # whether a guidance embedding is computed in this call


@dataclass(frozen=True)
class BlockWork:
    """What one block call actually computed; the full block is the default of every field."""

    batch: int
    image_tokens: int  # image tokens that entered the block (queries, keys and values)
    text_tokens: int
    mlp_image_tokens: int | None = None  # image tokens that went through the MLP (None: all)
    heads: int | None = None  # attention heads kept (None: all)
    mlp_hidden: int | None = None  # MLP hidden units kept (None: all)
    extra_flops: float = 0.0  # work a method added around the block (routers, LoRA bypasses)


@dataclass(frozen=True)
class BlockInternals:
    """Reductions inside one block call, contributed by the methods; the default is the full block.

    Heads and MLP groups are small sorted tuples (they double as cache keys for sliced weights).
    """

    heads: tuple[int, ...] | None = None  # attention heads kept, shared by all streams of the block
    mlp_groups: tuple[int, ...] | None = None  # MLP hidden-unit groups kept, of `mlp_group_count`
    mlp_group_count: int = 0
    mlp_tokens: torch.Tensor | None = None  # (B, k) image tokens that run the MLP; the others skip it
    extras: Mapping[str, LinearExtra] = field(default_factory=dict)  # linear name -> addend (LoRA bypass)

    @property
    def is_full(self) -> bool:
        return self.heads is None and self.mlp_groups is None and self.mlp_tokens is None and not self.extras

    def with_changes(self, **changes: Any) -> "BlockInternals":
        return replace(self, **changes)


@dataclass(frozen=True)
class TokenLayout:
    """Where text and image tokens sit inside the sequences a block receives."""

    text_first: bool  # joint sequences (and RoPE `pe`) are [text, image]
    pe_sequence_dim: int  # dimension of `pe` that runs along the joint sequence


class ModelAdapter(ABC):
    """Describes one supported model family to the executor and the methods."""

    family: ClassVar[str]
    display_name: ClassVar[str]
    # Human-readable names of the variants this adapter accepts, for error messages.
    supported_variants: ClassVar[tuple[str, ...]]

    @classmethod
    @abstractmethod
    def claims(cls, diffusion_model: torch.nn.Module) -> bool:
        """True if the model belongs to this family tree, even a variant the adapter refuses.

        Claiming lets the adapter explain precisely why a near relative (Flux 2, Chroma) is refused.
        """

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        """Inspect and validate; raise UnsupportedModelError for a variant that is not supported."""

    # --- blocks -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> tuple[BlockRef, ...]:
        """Every block in execution order."""

    @abstractmethod
    def patch_key(self, block: BlockRef) -> tuple[str, int]:
        """The key ComfyUI uses in `patches_replace["dit"]` for this block."""

    @abstractmethod
    def block_module(self, diffusion_model: torch.nn.Module, block: BlockRef) -> torch.nn.Module:
        ...

    @abstractmethod
    def token_layout(self, block: BlockRef) -> TokenLayout:
        ...

    @abstractmethod
    def block_tokens(self, block: BlockRef, args: Mapping[str, Any], text_tokens: int) -> BlockWork:
        """Token counts of a block call from its replacement-patch arguments (full work)."""

    @abstractmethod
    def linear_layers(self, module: torch.nn.Module, block: BlockRef) -> dict[str, torch.nn.Module]:
        """The block's linear layers by the names `BlockInternals.extras` uses (e.g. "img_attn.qkv")."""

    @abstractmethod
    def run_block(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        internals: BlockInternals,
        flop_log: list[float],
        text_tokens: int,
        cache: RunIndexCache,
    ) -> dict:
        """Run the block's own forward with `internals` applied (compute really removed).

        Returns the same dict a ComfyUI `original_block` returns; extra FLOPs (LoRA bypasses) are
        appended to `flop_log`. Index tensors that depend only on the decision go into `cache`.
        """

    @abstractmethod
    def reduced_work(self, block: BlockRef, work: BlockWork, internals: BlockInternals) -> BlockWork:
        """`work` with the reductions of `internals` applied (for the analytic FLOPs)."""

    # --- token routing (optional: a family that cannot route tokens leaves these out) ------------
    @property
    def routes_tokens(self) -> bool:
        """Whether this adapter implements the three token-routing methods below."""
        return False

    def image_tokens(self, block: BlockRef, stream: Mapping[str, Any], text_tokens: int) -> torch.Tensor:
        """The (B, N, D) image tokens of a block's arguments or output, as a view (writes go through)."""
        raise NotImplementedError(f"the {self.display_name} adapter cannot route tokens")

    def select_image_tokens(
        self, block: BlockRef, args: Mapping[str, Any], index: torch.Tensor, text_tokens: int
    ) -> dict:
        """Block arguments restricted to the image tokens `index` (B, k) (0..N-1, sorted) and every text token.

        The token streams are fresh tensors (the block may update them in place without touching
        `args`), and RoPE / attention masks are gathered along with the tokens.
        """
        raise NotImplementedError(f"the {self.display_name} adapter cannot route tokens")

    def merge_image_tokens(
        self, block: BlockRef, args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor, text_tokens: int
    ) -> dict:
        """The full block output: image tokens `index` and the text from `reduced_out`, every other image
        token as it is in `args`. Written into the tensors of `args`, as the host's blocks do."""
        raise NotImplementedError(f"the {self.display_name} adapter cannot route tokens")

    # --- calls --------------------------------------------------------------------------------
    @abstractmethod
    def call_shape(self, arguments: Mapping[str, Any]) -> CallShape:
        """Token counts of a model call from the diffusion model's arguments (by parameter name)."""

    # --- analytic FLOPs -----------------------------------------------------------------------
    @abstractmethod
    def stem_flops(self, shape: CallShape) -> FlopBreakdown:
        """Everything outside the blocks: embeddings, final layer."""

    @abstractmethod
    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        ...

    def full_flops(self, shape: CallShape) -> FlopBreakdown:
        """FLOPs of the unpatched model for a call of this shape."""
        total = self.stem_flops(shape)
        for block in self.blocks:
            total = total + self.block_flops(block, self.full_block_work(block, shape))
        return total

    def full_block_work(self, block: BlockRef, shape: CallShape) -> BlockWork:
        return BlockWork(batch=shape.batch, image_tokens=shape.image_tokens, text_tokens=shape.text_tokens)

    # --- width: unit counts, calibration inputs, timestep features ----------------------------
    # Optional seam for methods that thin attention heads and MLP channel groups; a family that
    # does not implement it cannot use those methods (the error names the family).
    @property
    def head_count(self) -> int:
        """Attention heads per block (the unit BlockInternals.heads counts)."""
        raise NotImplementedError(f"{self.display_name}: attention heads are not described by this adapter")

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden units per block (split into BlockInternals.mlp_group_count equal groups)."""
        raise NotImplementedError(f"{self.display_name}: MLP widths are not described by this adapter")

    @property
    def output_channels(self) -> int:
        """Channels of the latent the sampler integrates (the model's output)."""
        raise NotImplementedError(f"{self.display_name}: the latent layout is not described by this adapter")

    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        """Model-call arguments (by the host's parameter names) for `latent` at `timestep` with neutral
        conditioning: empty text, no pooled vector, as ComfyUI's ConditioningZeroOut gives."""
        raise NotImplementedError(f"{self.display_name}: calibration inputs are not described by this adapter")

    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, F) features of the timestep alone (no text, no guidance), computed by the model's own code."""
        raise NotImplementedError(f"{self.display_name}: timestep features are not described by this adapter")

    def measure_units(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        mlp_group_count: int,
        weights: WeightSource,
    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Run the block's own forward at full width and measure each unit's share of its output.

        Returns the block's output (as `original_block` returns it), and per attention head (H,) and
        per MLP group (G,) the sum over tokens of the L2 norm of that unit's contribution to the
        residual stream (after the block's gate), divided by the number of tokens.
        """
        raise NotImplementedError(f"{self.display_name}: unit contributions are not described by this adapter")

    # --- coarse patch grids -------------------------------------------------------------------
    def coarse_grid(self) -> "CoarseGrid | None":
        """How this family runs a call on a coarser patch grid (`adapters/coarse.py`); None if it cannot."""
        return None
