"""TD-LoRA (DyDiT++): timestep-gated mixtures of low-rank experts, applied as an in-place bypass.

For an adapted linear layer with weight W and K experts (A_k: r x in, B_k: out x r, one alpha):

    y = W x + strength * sum_k g_k(sigma) * B_k A_k x * (alpha / r)

The gates g(sigma) come from a small network over the noise level (sinusoidal embedding -> Linear
-> SiLU -> Linear -> softmax over K), shared by all layers or one per layer. A plain LoRA is the
K = 1 case (its gate is exactly 1). The experts are stacked, so a layer costs one pair of matmuls:
((x A^T) * gates spread over each expert's r columns) B^T; no full weight is ever merged.

The bypass is a `LinearExtra` (slicing.py): when another method narrows a layer (width slicing,
token subsets), the matching rows of B and columns of A are used, so it composes with them.

The file format (load, validate, save) is in `td_lora_file.py`; see the README section "TD-LoRA
file format". Reading standard LoRA key styles is ComfyUI-specific and lives in
`comfy_integration/td_lora_files.py`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F

from ...families import BlockInternals, BlockRef, ModelAdapter
from ...families.capabilities import SINUSOIDAL_TIME_SCALE
from ...core.flops import FlopBreakdown, linear_flops
from ...core.plan import MethodSettings
from ...core.method import DynamicMethod, register
from ...core.low_rank import GatedBypass, SummedExtra, expert_columns

if TYPE_CHECKING:
    from ...core.executor import CallState, ModelCall, RunContext

FORMAT = "td_lora"
VERSION = 1
METHOD = "td_lora"
STRENGTH_RANGE = (-10.0, 10.0)
DEFAULT_MAX_PERIOD = 10000.0

GATE_PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")  # nn.Sequential(Linear, SiLU, Linear)


# --- the gating network ------------------------------------------------------------------------------
def sinusoidal_embedding(
    sigmas: torch.Tensor, dim: int, time_scale: float | None = None, max_period: float = DEFAULT_MAX_PERIOD
) -> torch.Tensor:
    """(B,) sigmas -> (B, dim) float32: [cos(t f_0..f_{h-1}), sin(t f_0..f_{h-1})], t = time_scale * sigma,
    f_i = max_period^(-i / h), h = dim / 2 (a DiT's timestep embedding, cos first). `time_scale` None:
    the usual DiT scale; a bound TD-LoRA uses its model's (`ModelInfo.timestep_scale`)."""
    time_scale = SINUSOIDAL_TIME_SCALE if time_scale is None else time_scale
    if dim <= 0 or dim % 2:
        raise ValueError(f"the gate's sinusoidal embedding needs an even, positive size, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigmas.device) / half)
    args = (sigmas.float() * time_scale)[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


@dataclass(frozen=True, eq=False)
class GateWeights:
    """Parameters of one gating network: Linear(E -> H), SiLU, Linear(H -> K)."""

    weight1: torch.Tensor  # (H, E)
    bias1: torch.Tensor  # (H,)
    weight2: torch.Tensor  # (K, H)
    bias2: torch.Tensor  # (K,)

    @property
    def experts(self) -> int:
        return int(self.weight2.shape[0])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return dict(zip((f"{prefix}{p}" for p in GATE_PARAMS), (self.weight1, self.bias1, self.weight2, self.bias2)))


@dataclass(frozen=True, eq=False)
class GateNetwork:
    """Gates over K experts from sigma: softmax(W2 silu(W1 emb(sigma) + b1) + b2), per sample."""

    weights: GateWeights
    time_scale: float | None = None  # None: the model's timestep scale (set when the TD-LoRA runs on a model)
    max_period: float = DEFAULT_MAX_PERIOD

    @property
    def experts(self) -> int:
        return self.weights.experts

    def to(self, device: torch.device, time_scale: float | None = None) -> "GateNetwork":
        """On `device` in float32; a file that left the time scale open gets `time_scale` (the model's)."""
        w = self.weights
        moved = GateWeights(*(t.to(device=device, dtype=torch.float32) for t in (w.weight1, w.bias1, w.weight2, w.bias2)))
        return GateNetwork(moved, self.time_scale if self.time_scale is not None else time_scale, self.max_period)

    def __call__(self, sigmas: torch.Tensor) -> torch.Tensor:
        """(B,) sigmas -> (B, K) float32 gates that sum to 1 per sample."""
        w = self.weights
        embedding = sinusoidal_embedding(sigmas, int(w.weight1.shape[1]), self.time_scale, self.max_period)
        hidden = F.silu(F.linear(embedding, w.weight1.float(), w.bias1.float()))
        return torch.softmax(F.linear(hidden, w.weight2.float(), w.bias2.float()), dim=-1)

    def flops(self, batch: int) -> float:
        hidden, embed = self.weights.weight1.shape
        return linear_flops(batch, embed, hidden) + linear_flops(batch, hidden, self.experts)


# --- adapted layers ---------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LowRankLayer:
    """The bypass of one linear layer: experts stacked expert-major along the rank axis.

    Column c of `up` (row c of `down`) belongs to expert c // rank and is scaled by column_scale[c]
    (alpha / r of its expert, or of the LoRA piece it came from when a standard LoRA adapts slices
    of the layer, e.g. diffusers' separate q, k, v on Flux's fused qkv).
    """

    down: torch.Tensor  # (R, in) with R = experts * rank
    up: torch.Tensor  # (out, R)
    column_scale: torch.Tensor  # (R,) float32
    experts: int = 1
    gate: GateNetwork | None = None  # this layer's own gate; None: the file's shared gate (or K = 1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0]) // self.experts

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @classmethod
    def from_experts(cls, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float, gate: GateNetwork | None = None):
        """From K experts: lora_a (K, r, in), lora_b (K, out, r)."""
        experts, rank, _ = lora_a.shape
        down = lora_a.reshape(experts * rank, lora_a.shape[2])
        up = lora_b.permute(1, 0, 2).reshape(lora_b.shape[1], experts * rank)
        scale = torch.full((experts * rank,), float(alpha) / rank, dtype=torch.float32)
        return cls(down.contiguous(), up.contiguous(), scale, experts, gate)

    def cast(self, strength: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """down, and up scaled by strength * alpha / r, in the dtype and on the device of `like`."""
        up = self.up.float() * (self.column_scale * strength)[None, :]
        return (
            self.down.to(device=like.device, dtype=like.dtype).contiguous(),
            up.to(device=like.device, dtype=like.dtype).contiguous(),
        )

    def expert_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, r, in) and (K, out, r): the inverse of `from_experts` (without the scale)."""
        k, r = self.experts, self.rank
        return self.down.reshape(k, r, -1), self.up.reshape(-1, k, r).permute(1, 0, 2)


# --- a loaded adapter -------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TDLoRA:
    """A loaded TD-LoRA (or a standard LoRA read as K = 1), not yet bound to a model.

    `layers` are named by the diffusion model's own module paths (ComfyUI's Flux keys without the
    `diffusion_model.` prefix and `.weight` suffix, e.g. `double_blocks.0.img_attn.qkv`).
    `host_patches` are weight patches in the host's own format for what a bypass does not cover
    (standard LoRAs: layers outside the blocks, bias and norm diffs); the host integration applies them.
    """

    source: str
    experts: int
    layers: Mapping[str, LowRankLayer]
    gate: GateNetwork | None = None  # shared gate (gating "shared")
    gating: str = "none"  # "none" (K = 1), "shared" or "per_layer"
    architecture: Mapping[str, str] | None = None  # file metadata to check against the model; None: checked by key
    host_patches: Mapping[Any, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.source))[0] or self.source

    def describe(self) -> str:
        return f"{self.name} K={self.experts}"


def architecture_metadata(adapter: ModelAdapter) -> dict[str, str]:
    """The metadata a TD-LoRA file for this model carries (and must match on load)."""
    return adapter.model_info().header()


def block_linear_index(adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> dict[str, tuple[BlockRef, str, torch.nn.Module]]:
    """Every linear inside the blocks by its module path: path -> (block, name in the block, layer)."""
    paths = {id(module): path for path, module in diffusion_model.named_modules()}
    index = {}
    for block in adapter.blocks:
        module = adapter.block_module(diffusion_model, block)
        for name, layer in adapter.linear_layers(module, block).items():
            index[paths[id(layer)]] = (block, name, layer)
    return index


def block_linear_shapes(adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear a TD-LoRA can gate, by module path (what a trainer adapts)."""
    shapes = linear_shapes(diffusion_model)
    return {path: shapes[path] for path in block_linear_index(adapter, diffusion_model)}


def linear_shapes(diffusion_model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every module with a 2-D weight, by module path."""
    shapes = {}
    for path, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 2:
            shapes[path] = (int(weight.shape[0]), int(weight.shape[1]))
    return shapes


@dataclass(frozen=True)
class BoundLayers:
    """A TD-LoRA resolved against one model: bypasses per block, and K = 1 layers outside the blocks."""

    blocks: Mapping[BlockRef, Mapping[str, LowRankLayer]]
    outside: Mapping[str, LowRankLayer]


def bind_layers(lora: TDLoRA, adapter: ModelAdapter, diffusion_model: torch.nn.Module) -> BoundLayers:
    """Check `lora` against the model (architecture, layer names, shapes); raise ValueError naming the key."""
    if lora.architecture is not None:
        expected = architecture_metadata(adapter)
        for key, value in expected.items():
            found = lora.architecture.get(key)
            if found is None:
                raise ValueError(f"{lora.source}: the metadata has no '{key}' (a TD-LoRA file must name the model it was made for).")
            if str(found) != value:
                raise ValueError(
                    f"{lora.source}: made for another model: metadata '{key}' is {found!r}, this {adapter.display_name} model "
                    f"has {value!r} ({', '.join(f'{k}={v}' for k, v in expected.items())})."
                )
    index = block_linear_index(adapter, diffusion_model)
    shapes = linear_shapes(diffusion_model)
    blocks: dict[BlockRef, dict[str, LowRankLayer]] = {}
    outside: dict[str, LowRankLayer] = {}
    for path, layer in lora.layers.items():
        if path not in shapes:
            raise ValueError(
                f"{lora.source}: '{path}' names no linear layer of this {adapter.display_name} model "
                f"({adapter.display_name} layers look like '{next(iter(index), '?')}'). Is the file for another model?"
            )
        out_features, in_features = shapes[path]
        if (layer.out_features, layer.in_features) != (out_features, in_features):
            raise ValueError(
                f"{lora.source}: '{path}' adapts a {layer.in_features} -> {layer.out_features} layer, but this model's "
                f"'{path}' is {in_features} -> {out_features} (lora_A needs {in_features} columns, lora_B {out_features} rows)."
            )
        if path in index:
            block, name, _ = index[path]
            blocks.setdefault(block, {})[name] = layer
        elif layer.experts > 1:
            raise ValueError(
                f"{lora.source}: '{path}' is outside the transformer blocks and has K={layer.experts} experts. Layers outside "
                f"the blocks are merged once into the weights, which only a plain LoRA (K = 1) allows."
            )
        else:
            outside[path] = layer
    return BoundLayers(
        MappingProxyType({b: MappingProxyType(v) for b, v in blocks.items()}), MappingProxyType(outside)
    )


# --- settings and runtime ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TDLoRASettings(MethodSettings):
    method: ClassVar[str] = METHOD
    lora: TDLoRA
    bound: BoundLayers
    strength: float = 1.0
    weight_patches: Mapping[Any, Any] = field(default_factory=dict)  # what the host merged into weights, to undo on replace

    def validate(self, adapter: ModelAdapter) -> None:
        low, high = STRENGTH_RANGE
        if not (math.isfinite(self.strength) and low <= self.strength <= high):
            raise ValueError(f"TD-LoRA strength must be between {low:g} and {high:g}, got {self.strength}.")
        unknown = [b.label for b in self.bound.blocks if b not in adapter.blocks]
        if unknown:
            raise ValueError(f"TD-LoRA {self.lora.source}: blocks {', '.join(unknown)} do not exist in this model.")

    @property
    def enabled(self) -> bool:
        return self.strength != 0.0

    def describe(self) -> str:
        return f"TD-LoRA {self.lora.describe()} x{self.strength:g}"


def per_sample_sigmas(arguments: Mapping[str, Any], batch: int, fallback: float) -> torch.Tensor:
    """The sigma of every sample of a model call.

    ComfyUI passes the latent batch's sigmas as transformer_options["sigmas"]; cond/uncond chunks
    repeat that batch, so the sigmas tile over the chunks. Without them every sample gets the call's sigma.
    """
    options = arguments.get("transformer_options") or (arguments.get("kwargs") or {}).get("transformer_options") or {}
    sigmas = options.get("sigmas") if isinstance(options, Mapping) else None
    if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 0 and batch % sigmas.numel() == 0:
        return sigmas.detach().reshape(-1).float().repeat(batch // sigmas.numel())
    return torch.full((batch,), float(fallback), dtype=torch.float32)


class _CallGates:
    """The gates of one model call, computed once and shared by every block."""

    def __init__(self, call: "CallState", gates: dict[int, torch.Tensor]):
        self.call = call
        self.gates = gates  # id(gate network) -> (B, K) float32
        self._columns: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    def columns(self, gate: GateNetwork, rank: int, like: torch.Tensor) -> torch.Tensor:
        key = (id(gate), rank, like.dtype, like.device)
        columns = self._columns.get(key)
        if columns is None:
            columns = self._columns[key] = expert_columns(self.gates[id(gate)], rank).to(like)
        return columns


@register
class TDLoRAMethod(DynamicMethod):
    settings_type = TDLoRASettings
    order = 40

    def __init__(self, settings: TDLoRASettings, run: "RunContext") -> None:
        super().__init__(settings, run)
        self.lora = settings.lora
        self.bound = settings.bound
        self.gates = self._gate_networks()
        self._weights: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gates_on: dict[tuple[int, torch.device], GateNetwork] = {}
        self._current: _CallGates | None = None

    def _gate_networks(self) -> list[GateNetwork]:
        if self.lora.gate is not None:
            return [self.lora.gate]
        return [layer.gate for layers in self.bound.blocks.values() for layer in layers.values() if layer.gate is not None]

    # --- gates ----------------------------------------------------------------------------------
    def _compute_gates(self, call: "CallState", sigmas: torch.Tensor) -> _CallGates:
        gates = {}
        for network in self.gates:
            key = (id(network), sigmas.device)
            on_device = self._gates_on.get(key)
            if on_device is None:
                on_device = self._gates_on[key] = network.to(sigmas.device, self.run.adapter.model_info().timestep_scale)
            gates[id(network)] = on_device(sigmas)
            call.add_executed(FlopBreakdown(extra=network.flops(sigmas.shape[0])))
        state = _CallGates(call, gates)
        call.record.methods[self.name] = self._describe_call(call, state)
        return state

    def _describe_call(self, call: "CallState", state: _CallGates) -> str | Callable[[], str]:
        text = f"K={self.lora.experts} x{self.settings.strength:g}"
        if not state.gates:
            return text
        row = next((c.rows.start for c in call.chunks if c.kind == "cond"), 0)
        stacked = torch.stack([g[min(row, g.shape[0] - 1)] for g in state.gates.values()]).mean(dim=0)
        label = "gates" if len(state.gates) == 1 else f"gates (mean of {len(state.gates)} layers)"
        # the gates live on the device: the text is made when the run has ended, not now
        return lambda: f"{text} {label} " + "/".join(f"{g:.2f}" for g in stacked.tolist())

    def wrap_model_call(
        self, call: "CallState", model_call: "ModelCall", proceed: Callable[["ModelCall"], torch.Tensor]
    ) -> torch.Tensor:
        batch = self.run.adapter.call_layout(model_call.arguments).batch
        sigmas = per_sample_sigmas(model_call.arguments, batch, call.step.sigma).to(self.run.device)
        self._current = self._compute_gates(call, sigmas)
        try:
            return proceed(model_call)
        finally:
            self._current = None

    def gates_for(self, call: "CallState", batch: int) -> _CallGates:
        if self._current is None or self._current.call is not call:
            # Blocks reached without our model-level hook (e.g. called directly): one sigma for all samples.
            self._current = self._compute_gates(call, torch.full((batch,), float(call.step.sigma), device=self.run.device))
        return self._current

    # --- bypasses -------------------------------------------------------------------------------
    def _cast(self, layer: LowRankLayer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """down and strength * scale * up in the input's dtype and device, once per run."""
        key = (id(layer), like.dtype, like.device)
        cast = self._weights.get(key)
        if cast is None:
            cast = self._weights[key] = layer.cast(self.settings.strength, like)
        return cast

    def block_internals(
        self, call: "CallState", block: BlockRef, args: dict, internals: BlockInternals
    ) -> BlockInternals:
        layers = self.bound.blocks.get(block)
        if not layers:
            return internals
        like = self.run.adapter.hidden_states(block, args)
        state = self.gates_for(call, like.shape[0])
        extras = dict(internals.extras)
        for name, layer in layers.items():
            down, up = self._cast(layer, like)
            gate = layer.gate if layer.gate is not None else self.lora.gate
            columns = state.columns(gate, layer.rank, like) if gate is not None and layer.experts > 1 else None
            bypass = GatedBypass(down, up, columns)
            extras[name] = SummedExtra(extras[name], bypass) if name in extras else bypass
        return internals.with_changes(extras=extras)

    def finish(self) -> None:
        self._weights.clear()
        self._gates_on.clear()
        self._current = None

