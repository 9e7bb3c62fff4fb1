"""The student: the frozen host model with trainable dynamic parts, run through the host's own blocks.

Trainable parts (any subset):
- "width": per block, linear maps of the model's own timestep features to head and MLP-group logits
  (exactly the width router file's parametrisation); a unit is kept where its logit is > 0. During
  training the keep decisions are straight-through Gumbel-sigmoid gates and applied as *masks* on the
  inputs of the output linears (attention proj / MLP out / single-block linear2). Masking a head's
  (or group's) columns there is exactly what slicing it away does at inference: heads attend
  independently and an MLP group's units only meet the network through those columns.
- "td_lora": K low-rank experts per block linear, mixed by a gate over sigma (the TD-LoRA file
  format's parametrisation), as the compensation that makes the reduced model match the full one.

Every block runs as the host block class's own `forward` on a `ModuleView` whose linears are wrapped
(nothing of the host's forward is copied), through the host's `patches_replace["dit"]` point.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..adapters import BlockRef, CallShape, ModelAdapter
from ..adapters.flux_blocks import call_forward
from ..methods.td_lora import block_linear_index, sinusoidal_embedding
from ..slicing import ModuleView
from .objectives import gumbel_sigmoid

PARTS = ("width", "td_lora")
WIDTH_PARTS = ("both", "heads", "mlp")


@dataclass(frozen=True)
class StudentSpec:
    """What the student learns."""

    parts: tuple[str, ...] = ("width", "td_lora")
    width_parts: str = "both"  # what the width router thins: "both", "heads" or "mlp"
    mlp_groups: int = 0  # MLP channel groups per block; 0 = one per head (the Width Patcher's default)
    experts: int = 2  # TD-LoRA K
    rank: int = 4
    gate_hidden: int = 32
    gate_embed: int = 64
    init_logit: float = 3.0  # router bias at the start: every unit kept (training starts from full compute)

    def validate(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"Trainer: parts must be a non-empty subset of {', '.join(PARTS)}, got {', '.join(self.parts) or 'none'}.")
        if self.width_parts not in WIDTH_PARTS:
            raise ValueError(f"Trainer: width parts must be one of {', '.join(WIDTH_PARTS)}, got '{self.width_parts}'.")
        if self.experts < 1 or self.rank < 1:
            raise ValueError(f"Trainer: TD-LoRA needs experts >= 1 and rank >= 1, got K={self.experts}, r={self.rank}.")
        if self.mlp_groups < 0:
            raise ValueError(f"Trainer: mlp_groups must be >= 0 (0 = one per head), got {self.mlp_groups}.")


class _Adapted:
    """A block linear as the student calls it: the host layer, plus the TD-LoRA bypass, with an optional
    mask on its input columns (the width decision of the heads / groups feeding it)."""

    def __init__(self, layer: torch.nn.Module, lora: tuple[torch.Tensor, torch.Tensor] | None,
                 columns: torch.Tensor | None, mask: torch.Tensor | None):
        self.layer, self.lora, self.columns, self.mask = layer, lora, columns, mask

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:  # (B, in) per sample; x is (B, tokens, in) or (B, in)
            x = x * (self.mask.unsqueeze(1) if x.ndim == 3 else self.mask).to(x.dtype)
        out = self.layer(x)
        if self.lora is not None:
            down, up = self.lora  # (K*r, in), (out, K*r)
            hidden = F.linear(x, down.to(x.dtype))
            if self.columns is not None:
                hidden = hidden * (self.columns.unsqueeze(1) if x.ndim == 3 else self.columns).to(x.dtype)
            out = out + F.linear(hidden, up.to(x.dtype))
        return out


class _MaskedMLP:
    """nn.Sequential(Linear, act, Linear) with its hidden groups masked (the width decision) and bypasses."""

    def __init__(self, first: Callable, act: Callable, second: Callable):
        self.first, self.act, self.second = first, act, second

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.act(self.first(x)))


class DynamicStudent(torch.nn.Module):
    """Trainable dynamic parts around a frozen host diffusion model (kept outside the module's parameters,
    so DistributedDataParallel and checkpoints see only the small trainable parts)."""

    def __init__(self, adapter: ModelAdapter, diffusion_model: torch.nn.Module, spec: StudentSpec,
                 feature_mean: torch.Tensor, feature_scale: float, seed: int = 0):
        super().__init__()
        spec.validate()
        self.spec, self.adapter = spec, adapter
        object.__setattr__(self, "diffusion_model", diffusion_model)  # not a submodule: frozen, never synced
        arch = adapter.arch
        self.blocks: tuple[BlockRef, ...] = tuple(adapter.blocks)
        self.head_count, self.head_dim = adapter.head_count, arch.head_dim
        self.group_count = spec.mlp_groups or adapter.head_count
        if adapter.mlp_hidden % self.group_count:
            raise ValueError(f"Trainer: {self.group_count} MLP groups do not divide the {adapter.mlp_hidden} MLP units.")
        self.group_size = adapter.mlp_hidden // self.group_count
        self.thin_heads = "width" in spec.parts and spec.width_parts in ("both", "heads")
        self.thin_mlp = "width" in spec.parts and spec.width_parts in ("both", "mlp")
        generator = torch.Generator().manual_seed(seed)
        features = int(arch.hidden_size)
        blocks = len(self.blocks)
        # Router features are normalised while training ((f - mean) / scale), folded into the file's W, b.
        self.register_buffer("feature_mean", feature_mean.detach().float().clone())
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale)))
        if self.thin_heads:
            self.head_weight = torch.nn.Parameter(torch.randn(blocks, self.head_count, features, generator=generator) * 0.01)
            self.head_bias = torch.nn.Parameter(torch.full((blocks, self.head_count), spec.init_logit))
        if self.thin_mlp:
            self.group_weight = torch.nn.Parameter(torch.randn(blocks, self.group_count, features, generator=generator) * 0.01)
            self.group_bias = torch.nn.Parameter(torch.full((blocks, self.group_count), spec.init_logit))
        self.lora_paths: dict[str, tuple[BlockRef, str]] = {}
        self.lora_down = torch.nn.ParameterDict()
        self.lora_up = torch.nn.ParameterDict()
        if "td_lora" in spec.parts:
            k, r = spec.experts, spec.rank
            for path, (block, name, layer) in block_linear_index(adapter, diffusion_model).items():
                out_features, in_features = layer.weight.shape
                key = path.replace(".", "/")
                self.lora_paths[key] = (block, name)
                # A random, B zero: the bypass starts at exactly zero (the student starts as the teacher)
                self.lora_down[key] = torch.nn.Parameter(torch.randn(k * r, in_features, generator=generator) / math.sqrt(in_features))
                self.lora_up[key] = torch.nn.Parameter(torch.zeros(out_features, k * r))
            if k > 1:
                self.gate = torch.nn.Sequential(
                    torch.nn.Linear(spec.gate_embed, spec.gate_hidden), torch.nn.SiLU(), torch.nn.Linear(spec.gate_hidden, k)
                )
                with torch.no_grad():  # uniform gates at the start; the first layer seeded like everything else
                    self.gate[0].weight.copy_(torch.randn(spec.gate_hidden, spec.gate_embed, generator=generator) / math.sqrt(spec.gate_embed))
                    self.gate[0].bias.zero_()
                    self.gate[2].weight.zero_()
                    self.gate[2].bias.zero_()
        self._by_block: dict[BlockRef, dict[str, str]] = {}
        for key, (block, name) in self.lora_paths.items():
            self._by_block.setdefault(block, {})[name] = key
        self._coefficients: dict[CallShape, tuple[float, torch.Tensor, torch.Tensor, float]] = {}

    # --- decisions ----------------------------------------------------------------------------------
    def features(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, D) normalised router features: the model's own time_in(sinusoidal(t)), as the router file reads them."""
        with torch.no_grad():
            raw = self.adapter.timestep_features(self.diffusion_model, timestep, dtype).float()
        return (raw - self.feature_mean) / self.feature_scale

    def masks(self, timestep: torch.Tensor, dtype: torch.dtype, temperature: float, noise: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, blocks, H) and (B, blocks, G) keep gates: hard 0/1 values with straight-through gradients;
        noise = 0 gives the deterministic decision inference makes (keep where logit > 0)."""
        if "width" not in self.spec.parts:
            return None, None
        feats = self.features(timestep, dtype)

        def gates(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            logits = torch.einsum("buf,sf->sbu", weight, feats) + bias
            if noise > 0:
                uniform = torch.rand(logits.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(logits.device)
                logits = logits + noise * (torch.log(uniform) - torch.log1p(-uniform))
            hard = gumbel_sigmoid(logits, temperature, hard=True, noise=False)
            # inference keeps the largest logit where none is positive; so does training
            none = (hard.detach().sum(-1, keepdim=True) == 0).to(hard.dtype)
            top = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(hard.dtype)
            return hard + none * top

        heads = gates(self.head_weight, self.head_bias) if self.thin_heads else None
        groups = gates(self.group_weight, self.group_bias) if self.thin_mlp else None
        return heads, groups

    def lora_columns(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """(B, K*r) expert gates spread over their rank columns (None for K = 1: the gate is 1)."""
        if "td_lora" not in self.spec.parts or self.spec.experts == 1:
            return None
        embedding = sinusoidal_embedding(sigmas.float(), self.spec.gate_embed)
        gates = torch.softmax(self.gate(embedding), dim=-1)
        return gates.repeat_interleave(self.spec.rank, dim=1)

    # --- FLOPs --------------------------------------------------------------------------------------
    def flop_coefficients(self, shape: CallShape) -> tuple[float, torch.Tensor, torch.Tensor, float]:
        """A call's FLOPs as base + sum_b (a_b * heads kept_b + c_b * groups kept_b), per sample, with the
        TD-LoRA bypasses included (their in/out sizes shrink with the width, as the sliced bypass does),
        and the full model's FLOPs per sample. Exact: every term is linear in the kept heads and groups."""
        found = self._coefficients.get(shape)
        if found is not None:
            return found
        adapter, one = self.adapter, replace(shape, batch=1)
        base = adapter.stem_flops(one).total
        per_head, per_group = [], []
        for block in self.blocks:
            def flops(heads: int, groups: int) -> float:
                work = adapter.full_block_work(block, one)
                work = replace(work, heads=heads, mlp_hidden=groups * self.group_size,
                               extra_flops=self._lora_flops(block, work, heads, groups))
                return adapter.block_flops(block, work).total

            full = flops(self.head_count, self.group_count)
            a = (full - flops(0, self.group_count)) / self.head_count
            c = (full - flops(self.head_count, 0)) / self.group_count
            base += full - a * self.head_count - c * self.group_count
            per_head.append(a)
            per_group.append(c)
        found = (base, torch.tensor(per_head), torch.tensor(per_group), adapter.full_flops(one).total)
        self._coefficients[shape] = found
        return found

    def _lora_flops(self, block: BlockRef, work: Any, heads: int, groups: int) -> float:
        layers = self._by_block.get(block)
        if not layers:
            return 0.0
        inner, units, d = heads * self.head_dim, groups * self.group_size, self.adapter.arch.hidden_size
        n, t = work.image_tokens, work.text_tokens
        columns = self.spec.experts * self.spec.rank
        # (tokens, in, out) of each adapted linear at this width
        sizes = {
            "img_mod.lin": (1, d, 6 * d), "txt_mod.lin": (1, d, 6 * d), "modulation.lin": (1, d, 3 * d),
            "img_attn.qkv": (n, d, 3 * inner), "txt_attn.qkv": (t, d, 3 * inner),
            "img_attn.proj": (n, inner, d), "txt_attn.proj": (t, inner, d),
            "img_mlp.0": (n, d, units), "txt_mlp.0": (t, d, units), "img_mlp.2": (n, units, d), "txt_mlp.2": (t, units, d),
            "linear1": (n + t, d, 3 * inner + units), "linear2": (n + t, inner + units, d),
        }
        total = 0.0
        for name in layers:
            tokens, fan_in, fan_out = sizes[name]
            total += 2.0 * tokens * columns * (fan_in + fan_out)
        return total

    def flops_ratio(self, shape: CallShape, heads: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
        """(B,) differentiable FLOPs of each sample's call over the full model's."""
        base, per_head, per_group, full = self.flop_coefficients(shape)
        batch = shape.batch
        head_count = heads.sum(-1) if heads is not None else torch.full((batch, len(self.blocks)), float(self.head_count))
        group_count = groups.sum(-1) if groups is not None else torch.full((batch, len(self.blocks)), float(self.group_count))
        flops = base + (head_count * per_head.to(head_count)).sum(-1) + (group_count * per_group.to(group_count)).sum(-1)
        return flops / full

    # --- the forward --------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, torch.Tensor], temperature: float = 1.0, noise: float = 1.0,
                generator: torch.Generator | None = None, record_blocks: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's model output for a batch of recorded model inputs, and its (B,) FLOPs ratios."""
        x, timestep = inputs["x"], inputs["timestep"]
        dtype = x.dtype
        heads, groups = self.masks(timestep, dtype, temperature, noise, generator)
        columns = self.lora_columns(inputs["sigmas"])
        patches = {self.adapter.patch_key(b): self._block_patch(i, b, heads, groups, columns, record_blocks)
                   for i, b in enumerate(self.blocks)}
        options = {"patches_replace": {"dit": patches}, "sigmas": inputs["sigmas"]}
        kwargs = {k: inputs[k] for k in ("y", "guidance") if inputs.get(k) is not None}
        out = self.diffusion_model(x, timestep, inputs["context"], transformer_options=options, **kwargs)
        shape = self.adapter.call_shape({"x": x, "context": inputs["context"]})
        return out, self.flops_ratio(shape, heads, groups)

    def _block_patch(self, i: int, block: BlockRef, heads: torch.Tensor | None, groups: torch.Tensor | None,
                     columns: torch.Tensor | None, record: list | None) -> Callable[[dict, dict], dict]:
        head_mask = heads[:, i].repeat_interleave(self.head_dim, dim=-1) if heads is not None else None
        unit_mask = groups[:, i].repeat_interleave(self.group_size, dim=-1) if groups is not None else None
        names = self._by_block.get(block, {})

        def lora(name: str):
            key = names.get(name)
            return (self.lora_down[key], self.lora_up[key]) if key is not None else None

        def linear(layer: torch.nn.Module, name: str, mask: torch.Tensor | None = None):
            bypass = lora(name)
            if bypass is None and mask is None:
                return layer
            return _Adapted(layer, bypass, columns, mask)

        def modulation(module: torch.nn.Module, name: str):
            return ModuleView(module, lin=linear(module.lin, f"{name}.lin")) if lora(f"{name}.lin") is not None else module

        def patch(args: dict, extra: dict) -> dict:
            module = self.adapter.block_module(self.diffusion_model, block)
            if block.kind == "double":
                overrides: dict[str, Any] = {}
                for stream in ("img", "txt"):
                    attn, mlp = getattr(module, f"{stream}_attn"), getattr(module, f"{stream}_mlp")
                    overrides[f"{stream}_attn"] = ModuleView(
                        attn, qkv=linear(attn.qkv, f"{stream}_attn.qkv"), proj=linear(attn.proj, f"{stream}_attn.proj", head_mask)
                    )
                    overrides[f"{stream}_mlp"] = _MaskedMLP(
                        linear(mlp[0], f"{stream}_mlp.0"), mlp[1], linear(mlp[2], f"{stream}_mlp.2", unit_mask)
                    )
                    overrides[f"{stream}_mod"] = modulation(getattr(module, f"{stream}_mod"), f"{stream}_mod")
                img, txt = call_forward(type(module), ModuleView(module, **overrides), args)
                out = {"img": img, "txt": txt}
            else:
                mask = None
                if head_mask is not None or unit_mask is not None:
                    batch = args["img"].shape[0]
                    ones = args["img"].new_ones(batch, 1)
                    mask = torch.cat((
                        head_mask if head_mask is not None else ones.expand(batch, self.head_count * self.head_dim),
                        unit_mask if unit_mask is not None else ones.expand(batch, self.group_count * self.group_size),
                    ), dim=-1)
                view = ModuleView(module, linear1=linear(module.linear1, "linear1"), linear2=linear(module.linear2, "linear2", mask),
                                  modulation=modulation(module.modulation, "modulation"))
                out = {"img": call_forward(type(module), view, args)}
            if record is not None:
                record.append(out["img"])
            return out

        return patch
