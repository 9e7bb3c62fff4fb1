"""What an adapter hands out about its model family: plain objects the executor and the methods read.

The longer story: docs/architecture.md.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:
    from ..core.slicing import WeightSource
    from .base import BlockRef, BlockWork

# t = 1000 * sigma: how DiT families (DiT, Flux, Wan) embed a flow-matching sigma in [0, 1] as a time.
SINUSOIDAL_TIME_SCALE = 1000.0


@dataclass(frozen=True)
class ModelInfo:
    """Which model this is: the one description every file header of the pack is built from."""

    family: str  # e.g. "flux", "wan"
    display_name: str  # e.g. "Flux.1", "Wan 2.1"
    hidden_size: int
    num_heads: int
    mlp_hidden: int
    depths: tuple[tuple[str, int], ...]  # (block kind, count), in execution order
    # Family-specific facts a file may have to match (patch_size, in_channels, out_channels, ...), as strings.
    fields: Mapping[str, str] = field(default_factory=dict)
    # t = timestep_scale * sigma is the time the family embeds sinusoidally (Flux and Wan: 1000), the
    # default of a TD-LoRA gate's embedding.
    timestep_scale: float = SINUSOIDAL_TIME_SCALE
    # Parameters (by name in the diffusion model) every variant has, whose values identify the base
    # weights: what a trained file's fingerprint samples (fingerprint.py). Empty: the first 2-D ones.
    fingerprint_parameters: tuple[str, ...] = ()

    def header(self, *extra: str, weights: torch.nn.Module | None = None) -> dict[str, str]:
        """File metadata naming this model: architecture, hidden_size, num_heads, depth_<kind>, plus the
        `extra` fields a format also checks (e.g. "mlp_hidden", "patch_size"). With `weights` (the
        diffusion model), also `base_fingerprint`: a sample of those weights, for files that only fit
        them (trained parts); shapes alone cannot tell one fine-tune from another."""
        out = {"architecture": self.family, "hidden_size": str(self.hidden_size), "num_heads": str(self.num_heads)}
        out.update({f"depth_{kind}": str(count) for kind, count in self.depths})
        known = {"mlp_hidden": str(self.mlp_hidden), **self.fields}
        for name in extra:
            if name not in known:
                raise KeyError(f"{self.display_name} models have no header field '{name}' (known: {', '.join(known)})")
            out[name] = known[name]
        if weights is not None:
            from ..core.fingerprint import METADATA_KEY, fingerprint_text

            out[METADATA_KEY] = fingerprint_text(weights, self)
        return out


@dataclass(frozen=True)
class CallLayout:
    """Token counts of one model call, as the unpatched model would see them."""

    batch: int
    image_tokens: int  # latent tokens over every frame (Flux: with Kontext reference tokens)
    text_tokens: int  # text tokens the blocks see (Flux: in the joint sequence; Wan: cross-attention context)
    guidance: bool = False  # whether a guidance embedding is computed in this call
    frames: int = 1  # latent frames (video), after the time patch
    image_context_tokens: int = 0  # image-conditioning tokens in the cross-attention context (Wan i2v CLIP)
    timesteps: int = 1  # timestep embeddings per sample (Wan 2.2 TI2V 5B: one per latent frame)
    # Tokens at the end of the image stream that run every block in full, counted in `image_tokens`: an edit's
    # reference image (Qwen-Image Edit), the padding to a token multiple (Z-Image). Token routing and the MLP token
    # subsets act on the image tokens before them (`routable_tokens`).
    reference_tokens: int = 0
    references_at_time_zero: bool = False  # the reference tokens are modulated at timestep 0 (Qwen-Image Edit 2511)
    # What the host hands every block from its own scope rather than through the patch's arguments (Qwen-Image: the
    # text attention mask); identity, not value, is what a layout's equality sees of it.
    block_context: Any = field(default=None, compare=False)

    @property
    def routable_tokens(self) -> int:
        """The image tokens a token router may leave out of a block: all but the reference tokens."""
        return self.image_tokens - self.reference_tokens


@dataclass(frozen=True)
class MlpTokenGate:
    """Where one block linear carries the image tokens' MLP update (what SDT skips for a token): its input rows
    from `first_row` on are the image tokens in order, and either `columns` (first, count) of its input are the
    MLP's (the linear also reads the attention, and its bias is not the MLP's) or, with `columns` None, its whole
    output is the MLP's update. Scaling those by a token's 0/1 decision is exactly running or skipping its MLP."""

    first_row: int = 0
    columns: tuple[int, int] | None = None


class TokenRouting(ABC):
    """How a family's blocks let a subset of the image tokens run them."""

    @abstractmethod
    def image_tokens(self, block: "BlockRef", stream: Mapping[str, Any], layout: CallLayout) -> torch.Tensor:
        """The (B, N, D) image tokens of a block's arguments or output, as a view (writes go through)."""

    @abstractmethod
    def select(self, block: "BlockRef", args: Mapping[str, Any], index: torch.Tensor, layout: CallLayout) -> dict:
        """Block arguments restricted to the image tokens `index` (B, k) (0..N-1, sorted) and every text token.

        The token streams are fresh tensors (the block may update them in place without touching
        `args`); positions (RoPE) and masks are gathered along with the tokens.
        """

    @abstractmethod
    def merge(self, block: "BlockRef", args: Mapping[str, Any], reduced_out: Mapping[str, Any], index: torch.Tensor,
              layout: CallLayout) -> dict:
        """The full block output: image tokens `index` (and the text) from `reduced_out`, every other image
        token as it is in `args`. Written into the tensors of `args`, as the host's blocks do."""

    def mlp_token_gates(self, block: "BlockRef", layout: CallLayout) -> Mapping[str, MlpTokenGate]:
        """The block linears (by `BlockKind.linears` name) that carry the image tokens' MLP update, for a trainer
        that learns which tokens skip the MLP (DyDiT's SDT) with every token still running the block."""
        raise NotImplementedError(f"{type(self).__name__} does not say where a token's MLP update is (needed to train SDT routers)")


class WidthUnits(ABC):
    """Attention heads and MLP channel groups of a family's blocks, for dynamic width."""

    head_count: int  # attention heads per block (the unit BlockInternals.heads counts)
    mlp_hidden: int  # MLP hidden units per block (split into BlockInternals.mlp_group_count groups)

    @abstractmethod
    def calibration_latent(self, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Seeded noise in the shape of the latent the sampler integrates (batch 1), on the CPU."""

    @abstractmethod
    def neutral_arguments(self, latent: torch.Tensor, timestep: torch.Tensor, text_tokens: int, guidance: float) -> dict[str, Any]:
        """Model-call arguments (by the host's parameter names) for `latent` at `timestep` with neutral
        conditioning: empty text, no pooled vector, as ComfyUI's ConditioningZeroOut gives."""

    @abstractmethod
    def timestep_features(self, diffusion_model: torch.nn.Module, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, hidden_size) features of the timestep alone (no text, no guidance), computed by the model's own code."""

    def unit_columns(self, block: "BlockRef") -> Mapping[str, tuple[tuple[str, int, int], ...]]:
        """The block's output linears (by `BlockKind.linears` name) and the input columns each unit kind
        owns there: (kind "heads" or "groups", first column, columns of all units of that kind). Zeroing a
        unit's columns is exactly what removing the unit does, which is how a trainer masks it."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its output columns (needed to train a width router)")

    def linear_sizes(self, block: "BlockRef", work: "BlockWork") -> Mapping[str, tuple[int, int, int]]:
        """(rows, in_features, out_features) of each block linear for a call of `work` at its width
        (`work.heads`, `work.mlp_hidden`); rows counts the batch. A trainer's bypass FLOPs follow them."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its linear sizes (needed to train TD-LoRA with width)")

    @abstractmethod
    def measure_units(self, module: torch.nn.Module, block: "BlockRef", args: Mapping[str, Any], mlp_group_count: int,
                      weights: "WeightSource") -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Run the block's own forward at full width and measure each unit's share of its output.

        Returns the block's output (as `original_block` returns it), and per attention head (H,) and
        per MLP group (G,) the sum over tokens of the L2 norm of that unit's contribution to the
        residual stream (after the block's gate), divided by the number of tokens.
        """
