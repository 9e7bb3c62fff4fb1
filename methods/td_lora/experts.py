"""TD-LoRA's parts as plain tensors: K low-rank experts per linear and the gate network that mixes them over sigma."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ...families.capabilities import SINUSOIDAL_TIME_SCALE
from ...core.flops import linear_flops


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
