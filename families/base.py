"""The model-adapter seam: what the executor and the methods need to know about a DiT family.

An adapter describes one model family (a package under `adapters/`): which blocks exist and how
ComfyUI addresses them, the capabilities it offers (capabilities.py, coarse.py), and the analytic
FLOPs of every part. Adapters never import ComfyUI; they inspect the `torch.nn.Module` the host built.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping

import torch

from ..core.flops import FlopBreakdown
from ..core.slicing import LinearExtra, RunIndexCache
from .capabilities import CallLayout, ModelInfo, TokenRouting, WidthUnits

if TYPE_CHECKING:
    from .coarse import CoarseGrid



class UnsupportedModelError(ValueError):
    """The model is not a family (or variant) this pack knows how to patch safely."""


def class_path(obj: object) -> str:
    """Where the host defines an object's class, e.g. "comfy.ldm.flux.model.Flux" (what an adapter checks it claims)."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def linear_shape(layer: torch.nn.Module, name: str, family: str) -> tuple[int, int]:
    """(out_features, in_features) of the host's linear layer at `name`, or UnsupportedModelError naming it."""
    weight = getattr(layer, "weight", None)
    if weight is None or weight.ndim != 2:
        raise UnsupportedModelError(f"{family} adapter: expected a Linear layer at '{name}', found {type(layer).__name__}.")
    return int(weight.shape[0]), int(weight.shape[1])


@dataclass(frozen=True, order=True)
class BlockRef:
    """One transformer block, e.g. the 3rd double-stream block of Flux."""

    kind: str  # family specific, e.g. "double" / "single"
    index: int

    @property
    def label(self) -> str:
        return f"{self.kind}.{self.index}"


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
    reference_tokens: int = 0  # of `image_tokens`, reference tokens that always run the whole block (Qwen-Image Edit)

    def kept_heads(self, full: int) -> int:
        """Attention heads the call ran, of the block's `full` count."""
        return full if self.heads is None else self.heads

    def kept_mlp(self, full: int) -> int:
        """MLP hidden units the call ran, of the block's `full` count."""
        return full if self.mlp_hidden is None else self.mlp_hidden

    @property
    def mlp_tokens(self) -> int:
        """Image tokens that went through the MLP."""
        return self.image_tokens if self.mlp_image_tokens is None else self.mlp_image_tokens


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
    # Training only (the executor never sets it): linear name -> a function of the host layer returning what
    # the block calls instead (a trainer's masked linear with trainable bypasses). Full width only: masks
    # keep every column, so nothing is removed; the trained decisions remove it at inference.
    linear_overrides: Mapping[str, Callable[[torch.nn.Module], Callable[[torch.Tensor], torch.Tensor]]] = field(default_factory=dict)

    @property
    def is_full(self) -> bool:
        return (self.heads is None and self.mlp_groups is None and self.mlp_tokens is None and not self.extras
                and not self.linear_overrides)

    @property
    def adapted_linears(self) -> frozenset[str]:
        """Names of the linears an extra or an override touches (the block views rebuild those)."""
        return frozenset(self.extras) | frozenset(self.linear_overrides)

    def overridden(self, layer: torch.nn.Module, name: str, narrowed: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The override of linear `name` built on `layer`, or None; refused on a narrowed layer."""
        build = self.linear_overrides.get(name)
        if build is None:
            return None
        if narrowed:
            raise ValueError(f"linear '{name}': a training override runs at full width only, not on a narrowed layer")
        return build(layer)

    def with_changes(self, **changes: Any) -> "BlockInternals":
        return replace(self, **changes)


@dataclass(frozen=True)
class BlockKind:
    """One kind of block of a family, as data: how ComfyUI addresses it and which linears it has."""

    kind: str  # BlockRef.kind, e.g. "double"
    patch_name: str  # the name in ComfyUI's `patches_replace["dit"]` keys, e.g. "double_block"
    module_list: str  # the diffusion model's attribute holding these blocks, e.g. "double_blocks"
    linears: tuple[str, ...]  # the block's linear layers by module path inside the block (BlockInternals.extras names)
    # True: the host's loop calls these blocks without a `patches_replace["dit"]` lookup; the pack emulates one on each
    # block's forward (integration/patch_points.py) through the adapter's `block_arguments`,
    # `run_original` and `block_result`, and `patch_name` is the pack's own key for it.
    emulated: bool = False


class ModelAdapter(ABC):
    """Describes one supported model family to the executor and the methods.

    The executor and the methods talk to an adapter only through what it hands out: `model_info()`,
    `call_layout()`, the block runner below (`blocks`, `run_block`, ...), and the optional
    capabilities `token_routing()`, `width_units()`, `coarse_grid()`. Nothing outside the adapter
    reads a family's argument names or constants.
    """

    family: ClassVar[str]
    display_name: ClassVar[str]
    # Human-readable names of the variants this adapter accepts, for error messages.
    supported_variants: ClassVar[tuple[str, ...]]
    # The family's block kinds in execution order, as data (patch keys, module lists, linear layers).
    block_kinds: ClassVar[tuple[BlockKind, ...]]
    # The diffusion model's parameter that holds the noisy latent (ComfyUI's DiTs all call it "x").
    latent_argument: ClassVar[str] = "x"
    # Its parameter that holds the timestep (what `WidthUnits.timestep_features` reads; ComfyUI's DiTs: "timestep").
    timestep_argument: ClassVar[str] = "timestep"
    # Numbers (not tensors) a model call carries that a trainer must replay as they were (LTX-Video's frame rate): kept
    # in its rows as one value per sample, given back as the number by `derived_arguments`.
    scalar_arguments: ClassVar[tuple[str, ...]] = ()
    # True: the model's forward does not run ComfyUI's DIFFUSION_MODEL wrappers (SD3's MMDiT); the pack runs them
    # around it through an object patch (integration/patch_points.py).
    emulated_model_wrappers: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def claims(cls, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> bool:
        """True if the model belongs to this family tree, even a variant the adapter refuses.

        Claiming lets the adapter explain precisely why a near relative (Flux 2, Chroma) is refused.
        """

    def __init__(self, diffusion_model: torch.nn.Module, host_model_name: str | None = None) -> None:
        """Inspect and validate; raise UnsupportedModelError for a variant that is not supported."""

    def _shape(self, layer: torch.nn.Module, name: str) -> tuple[int, int]:
        """(out_features, in_features) of the model's linear at `name`, or a refusal naming it (for `_describe`)."""
        return linear_shape(layer, name, self.display_name)

    def _refuse(self, what: str) -> None:
        """Refuse a variant or layout by its plain name, saying what is supported."""
        raise UnsupportedModelError(
            f"Dynamic DiT does not support {what} yet; it would not patch it blindly. "
            f"Supported: {', '.join(self.supported_variants)}."
        )

    # --- what the model is --------------------------------------------------------------------
    @abstractmethod
    def model_info(self) -> ModelInfo:
        """The model's description, the header every file format of the pack records and checks."""

    @abstractmethod
    def call_layout(self, arguments: Mapping[str, Any]) -> CallLayout:
        """Token counts of a model call from the diffusion model's arguments (by parameter name)."""

    def derived_arguments(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Call arguments that are not tensors but follow from the tensor ones (Z-Image's `num_tokens`: the caption
        length), by parameter name: a trainer records the tensors and rebuilds these when it replays a call."""
        return {}

    def latent(self, arguments: Mapping[str, Any]) -> torch.Tensor:
        """The noisy latent of a model call (B, C, H, W) or, for video, (B, C, T, H, W)."""
        return arguments[self.latent_argument]

    def block_layout(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> CallLayout:
        """The call's layout as this block call sees it (a family whose blocks reveal the text length
        refines it here); the executor keeps the result for the blocks that follow."""
        return layout

    # --- blocks -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def blocks(self) -> tuple[BlockRef, ...]:
        """Every block in execution order."""

    def block_kind(self, block: BlockRef) -> BlockKind:
        for kind in self.block_kinds:
            if kind.kind == block.kind:
                return kind
        raise KeyError(f"{self.display_name} has no '{block.kind}' blocks")

    # --- blocks without a host patch point (BlockKind.emulated) ---------------------------------
    def block_arguments(self, block: BlockRef, args: tuple, kwargs: Mapping[str, Any]) -> dict:
        """A block call's arguments as the dict a replace patch receives ("img", "vec", "pe", "transformer_options", ...)."""
        raise NotImplementedError(f"{self.display_name} blocks have their host's own patch point")

    def run_original(self, forward: Callable[..., Any], block: BlockRef, args: Mapping[str, Any]) -> dict:
        """The block's own `forward` on a replace patch's argument dict, its output as the patch's output dict."""
        raise NotImplementedError(f"{self.display_name} blocks have their host's own patch point")

    def block_result(self, block: BlockRef, out: Mapping[str, Any]) -> Any:
        """A replace patch's output dict as the block's forward returns it."""
        raise NotImplementedError(f"{self.display_name} blocks have their host's own patch point")

    def patch_key(self, block: BlockRef) -> tuple[str, int]:
        """The key ComfyUI uses in `patches_replace["dit"]` for this block."""
        return (self.block_kind(block).patch_name, block.index)

    def block_module(self, diffusion_model: torch.nn.Module, block: BlockRef) -> torch.nn.Module:
        return getattr(diffusion_model, self.block_kind(block).module_list)[block.index]

    def linear_names(self, block: BlockRef) -> tuple[str, ...]:
        """The block's linear layers by the names `BlockInternals.extras` uses, without the model."""
        return self.block_kind(block).linears

    def linear_layers(self, module: torch.nn.Module, block: BlockRef) -> dict[str, torch.nn.Module]:
        """The block's linear layers by the names `BlockInternals.extras` uses (e.g. "img_attn.qkv")."""
        return {name: module.get_submodule(name) for name in self.block_kind(block).linears}

    def hidden_states(self, block: BlockRef, args: Mapping[str, Any]) -> torch.Tensor:
        """The block call's main token stream: its batch, dtype and device are the call's (ComfyUI's block patches
        name it "img" in every family)."""
        return args["img"]

    @abstractmethod
    def block_work(self, block: BlockRef, args: Mapping[str, Any], layout: CallLayout) -> BlockWork:
        """Token counts of a block call from its replacement-patch arguments (full work)."""

    @abstractmethod
    def run_block(
        self,
        module: torch.nn.Module,
        block: BlockRef,
        args: Mapping[str, Any],
        internals: BlockInternals,
        flop_log: list[float],
        layout: CallLayout,
        cache: RunIndexCache,
    ) -> dict:
        """Run the block's own forward with `internals` applied (compute really removed).

        Returns the same dict a ComfyUI `original_block` returns; extra FLOPs (LoRA bypasses) are
        appended to `flop_log`. Index tensors that depend only on the decision go into `cache`.
        """

    def linear_sizes(self, block: BlockRef, work: BlockWork) -> Mapping[str, tuple[int, int, int]]:
        """(rows, in_features, out_features) of each block linear for a call of `work` (at its width where the family
        has width units: theirs), for the FLOPs of a trainer's low-rank bypasses."""
        units = self.width_units()
        if units is None:
            raise UnsupportedModelError(f"{self.display_name} does not describe its block linears for the FLOPs count.")
        return units.linear_sizes(block, work)

    def prepare_reductions(self, decisions: "Iterable[BlockInternals]", cache: RunIndexCache, device: torch.device) -> None:
        """Build ahead what running blocks with these reductions needs (index tensors), so block calls build nothing."""

    def reduced_work(self, block: BlockRef, work: BlockWork, internals: BlockInternals) -> BlockWork:
        """`work` with the reductions of `internals` applied (for the analytic FLOPs): kept heads, kept
        MLP groups (of the model's `mlp_hidden` units), MLP image tokens."""
        changes: dict[str, Any] = {}
        if internals.heads is not None:
            changes["heads"] = len(internals.heads)
        if internals.mlp_groups is not None:
            changes["mlp_hidden"] = len(internals.mlp_groups) * (self.model_info().mlp_hidden // internals.mlp_group_count)
        if internals.mlp_tokens is not None:
            changes["mlp_image_tokens"] = internals.mlp_tokens.shape[1] + work.reference_tokens
        return replace(work, **changes)

    # --- optional capabilities (None: the family cannot) ----------------------------------------
    def token_routing(self) -> "TokenRouting | None":
        """How a subset of the image tokens runs a block (the Token Router), or None."""
        return None

    def width_units(self) -> "WidthUnits | None":
        """The heads and MLP groups of the blocks (the Width Patcher), or None."""
        return None

    def coarse_grid(self) -> "CoarseGrid | None":
        """How this family runs a call on a coarser patch grid (`adapters/coarse.py`), or None."""
        return None

    # --- analytic FLOPs -----------------------------------------------------------------------
    @abstractmethod
    def stem_flops(self, layout: CallLayout) -> FlopBreakdown:
        """Everything outside the blocks: embeddings, final layer."""

    @abstractmethod
    def block_flops(self, block: BlockRef, work: BlockWork) -> FlopBreakdown:
        ...

    def full_flops(self, layout: CallLayout) -> FlopBreakdown:
        """FLOPs of the unpatched model for a call of this layout."""
        total = self.stem_flops(layout)
        for block in self.blocks:
            total = total + self.block_flops(block, self.full_block_work(block, layout))
        return total

    def full_block_work(self, block: BlockRef, layout: CallLayout) -> BlockWork:
        return BlockWork(batch=layout.batch, image_tokens=layout.image_tokens, text_tokens=layout.text_tokens,
                         reference_tokens=layout.reference_tokens)


def block_linear_index(adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> dict[str, tuple[BlockRef, str, torch.nn.Module]]:
    """Every linear inside the blocks by its module path: path -> (block, name in the block, layer)."""
    paths = {id(module): path for path, module in diffusion_model.named_modules()}
    index = {}
    for block in adapter.blocks:
        module = adapter.block_module(diffusion_model, block)
        for name, layer in adapter.linear_layers(module, block).items():
            index[paths[id(layer)]] = (block, name, layer)
    return index
