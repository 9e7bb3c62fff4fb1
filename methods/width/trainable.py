"""The width router as the trainer learns it (DyDiT's TDW): per block, linear maps of the model's own timestep
features to head and MLP-group logits, exactly the width router file's parametrisation; a unit is kept where its
logit is > 0. In training the keep decisions are straight-through Gumbel-sigmoid gates applied as masks on the
input columns each unit owns in the block's output linears (`WidthUnits.unit_columns`): masking a unit's columns
there is exactly what slicing it away does at inference. Masks exist only here, in training.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ...core.files import save_safetensors
from ...core.method import LinearPieces, TrainablePart, register_part
from ...families import BlockRef, CallLayout, UnsupportedModelError
from ...training.objectives import gumbel_sigmoid
from .file import RouterHeader, WidthRouter
from .settings import PARTS, default_group_count

if TYPE_CHECKING:
    from ...training.student import DynamicStudent, StudentCall, StudentContext, StudentSpec
    from ...training.trajectories import Trajectories


@register_part
class WidthPart(TrainablePart):
    part, order, learns_compute = "width", 10, True
    file_suffix, spec_fields = ".width.safetensors", ("width_parts", "mlp_groups", "init_logit")

    @classmethod
    def check(cls, spec: "StudentSpec") -> None:
        if spec.width_parts not in PARTS:
            raise ValueError(f"Trainer: width parts must be one of {', '.join(PARTS)}, got '{spec.width_parts}'.")
        if spec.mlp_groups < 0:
            raise ValueError(f"Trainer: mlp_groups must be >= 0 (0 = one per head, or the nearest count that divides the MLP), got {spec.mlp_groups}.")

    def __init__(self, context: "StudentContext") -> None:
        super().__init__()
        adapter, spec = context.adapter, context.spec
        units = adapter.width_units()
        if units is None:
            raise UnsupportedModelError(f"Trainer: {adapter.display_name} models have no dynamic width, so no width router can be trained.")
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "diffusion_model", context.diffusion_model)
        self.units, self.blocks, self.width_parts = units, tuple(adapter.blocks), spec.width_parts
        self.head_count = units.head_count
        self.group_count = spec.mlp_groups or default_group_count(self.head_count, units.mlp_hidden)
        if units.mlp_hidden % self.group_count:
            raise ValueError(f"Trainer: {self.group_count} MLP groups do not divide the {units.mlp_hidden} MLP units.")
        self.group_size = units.mlp_hidden // self.group_count
        self.thin_heads, self.thin_mlp = PARTS[spec.width_parts]
        features, blocks, generator = int(context.feature_mean.shape[-1]), len(self.blocks), context.generator
        # Router features are normalised while training ((f - mean) / scale), folded into the file's W, b.
        self.register_buffer("feature_mean", context.feature_mean.detach().float().clone())
        self.register_buffer("feature_scale", torch.tensor(float(context.feature_scale)))
        if self.thin_heads:
            self.head_weight = torch.nn.Parameter(torch.randn(blocks, self.head_count, features, generator=generator) * 0.01)
            self.head_bias = torch.nn.Parameter(torch.full((blocks, self.head_count), spec.init_logit))
        if self.thin_mlp:
            self.group_weight = torch.nn.Parameter(torch.randn(blocks, self.group_count, features, generator=generator) * 0.01)
            self.group_bias = torch.nn.Parameter(torch.full((blocks, self.group_count), spec.init_logit))
        self._columns = {block: units.unit_columns(block) for block in self.blocks}
        self._coefficients: dict[CallLayout, tuple[float, torch.Tensor, torch.Tensor, float]] = {}

    # --- decisions ----------------------------------------------------------------------------------
    def features(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, D) normalised router features: the model's own timestep features, as the router file reads them."""
        with torch.no_grad():
            raw = self.units.timestep_features(self.diffusion_model, timestep, dtype).float()
        return (raw - self.feature_mean) / self.feature_scale

    def masks(self, timestep: torch.Tensor, dtype: torch.dtype, temperature: float, noise: float,
              generator: torch.Generator | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, blocks, H) and (B, blocks, G) keep gates: hard 0/1 values with straight-through gradients;
        noise = 0 gives the deterministic decision inference makes (keep where logit > 0)."""
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

    def prepare(self, call: "StudentCall") -> None:
        timestep = call.inputs[self.adapter.timestep_argument]
        dtype = call.inputs[self.adapter.latent_argument].dtype
        call.decisions["heads"], call.decisions["groups"] = self.masks(timestep, dtype, call.temperature, call.noise, call.generator)

    def decision_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.startswith(("head_", "group_"))]

    # --- the block's linears ------------------------------------------------------------------------
    def linears(self, block: BlockRef) -> tuple[str, ...]:
        return tuple(self._columns.get(block, {}))

    def adapt_linear(self, call: "StudentCall", position: int, block: BlockRef, name: str, layer: torch.nn.Module,
                     pieces: LinearPieces) -> None:
        spans = self._columns.get(block, {}).get(name)
        gates = {"heads": call.decisions.get("heads"), "groups": call.decisions.get("groups")}
        if not spans or all(gates[kind] is None for kind, _, _ in spans):
            return
        live = next(g for g in gates.values() if g is not None)
        batch, device = live.shape[0], live.device
        in_features = int(layer.weight.shape[1])
        pieces_of_mask, at = [], 0
        for kind, start, width in sorted(spans, key=lambda span: span[1]):
            if start > at:
                pieces_of_mask.append(torch.ones(batch, start - at, device=device))
            gate = gates[kind]
            if gate is None:
                pieces_of_mask.append(torch.ones(batch, width, device=device))
            else:  # each unit's gate over its columns
                pieces_of_mask.append(gate[:, position].repeat_interleave(width // gate.shape[-1], dim=-1))
            at = start + width
        if at < in_features:
            pieces_of_mask.append(torch.ones(batch, in_features - at, device=device))
        pieces.mask = torch.cat(pieces_of_mask, dim=-1)

    # --- FLOPs --------------------------------------------------------------------------------------
    def flop_coefficients(self, student: "DynamicStudent", layout: CallLayout) -> tuple[float, torch.Tensor, torch.Tensor, float]:
        """A call's FLOPs as base + sum_b (a_b * heads kept_b + c_b * groups kept_b), per sample, with the other
        parts' additions included (a bypass's in/out sizes shrink with the width, as the sliced bypass does), and the
        full model's FLOPs per sample. Exact: every term is linear in the kept heads and groups."""
        found = self._coefficients.get(layout)
        if found is not None:
            return found
        adapter, one = self.adapter, replace(layout, batch=1)
        base = adapter.stem_flops(one).total
        per_head, per_group = [], []
        heads, groups = self.head_count, self.group_count
        for block in self.blocks:
            def flops(kept_heads: int, kept_groups: int) -> float:
                work = replace(adapter.full_block_work(block, one), heads=kept_heads, mlp_hidden=kept_groups * self.group_size)
                return student.block_flops(block, work)

            full = flops(heads, groups)
            a, c = (full - flops(0, groups)) / heads, (full - flops(heads, 0)) / groups
            base += full - a * heads - c * groups
            per_head.append(a)
            per_group.append(c)
        found = (base, torch.tensor(per_head), torch.tensor(per_group), adapter.full_flops(one).total)
        self._coefficients[layout] = found
        return found

    def flops_ratio(self, student: "DynamicStudent", layout: CallLayout, heads: torch.Tensor | None,
                    groups: torch.Tensor | None) -> torch.Tensor:
        """(B,) differentiable FLOPs of each sample's call over the full model's."""
        base, per_head, per_group, full = self.flop_coefficients(student, layout)
        shape = (layout.batch, len(self.blocks))
        head_count = heads.sum(-1) if heads is not None else torch.full(shape, float(self.head_count))
        group_count = groups.sum(-1) if groups is not None else torch.full(shape, float(self.group_count))
        flops = base + (head_count * per_head.to(head_count)).sum(-1) + (group_count * per_group.to(group_count)).sum(-1)
        return (flops / full).expand(layout.batch)

    def call_ratio(self, student: "DynamicStudent", call: "StudentCall") -> torch.Tensor:
        return self.flops_ratio(student, call.layout, call.decisions["heads"], call.decisions["groups"])

    def run_ratio(self, student: "DynamicStudent", bank: "Trajectories", *, noise: float = 0.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None, grad: bool = False) -> Any:
        """The decisions at every step of the schedule, averaged (a run calls the model once per step, at the
        shape of the recorded calls)."""
        rows = bank.fixed(1)
        device = next(iter(self.buffers())).device
        timesteps = torch.tensor(bank.timesteps, dtype=torch.float32, device=device)
        with torch.set_grad_enabled(grad):
            heads, groups = self.masks(timesteps, student.latent(rows).dtype, temperature, noise, generator)
            layout = replace(self.adapter.call_layout(student.arguments(rows)), batch=len(timesteps))
            ratio = self.flops_ratio(student, layout, heads, groups).mean()
        return ratio if grad else float(ratio)

    # --- the file ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {"width_parts": self.width_parts}

    def router(self, name: str = "trained router") -> WidthRouter:
        """The router in the file's parametrisation: logits = W f + b on the raw features (the training
        normalisation (f - mean) / scale folded in). A part that is not thinned keeps every unit (bias +1)."""
        header = RouterHeader.for_adapter(self.adapter, self.group_count)
        mean, scale = self.feature_mean.detach().float().cpu(), float(self.feature_scale)
        tensors: dict[str, torch.Tensor] = {}
        for row, block in enumerate(self.blocks):
            for part, units, thinned, weight, bias in (
                ("heads", self.head_count, self.thin_heads, getattr(self, "head_weight", None), getattr(self, "head_bias", None)),
                ("mlp", self.group_count, self.thin_mlp, getattr(self, "group_weight", None), getattr(self, "group_bias", None)),
            ):
                if thinned:
                    w = weight[row].detach().float().cpu() / scale
                    b = bias[row].detach().float().cpu() - w @ mean
                else:
                    w, b = torch.zeros(units, header.feature_dim), torch.ones(units)
                tensors[f"{block.label}.{part}.weight"], tensors[f"{block.label}.{part}.bias"] = w.contiguous(), b.contiguous()
        return WidthRouter(header, tensors, name)

    def save(self, student: "DynamicStudent", path: Any, metadata: dict[str, str]) -> None:
        router = self.router(path.name[: -len(self.file_suffix)])
        save_safetensors(router.tensors(), path, {**metadata, **router.header.metadata()})


__all__ = ["WidthPart"]
