"""The student: the frozen host model with trainable dynamic parts, run through the adapter's own blocks.

Trainable parts (any subset):
- "width": per block, linear maps of the model's own timestep features to head and MLP-group logits
  (exactly the width router file's parametrisation); a unit is kept where its logit is > 0. During
  training the keep decisions are straight-through Gumbel-sigmoid gates applied as *masks* on the input
  columns each unit owns in the block's output linears (`WidthUnits.unit_columns`). Masking a unit's
  columns there is exactly what slicing it away does at inference; masks exist only here, in training.
- "td_lora": K low-rank experts per block linear, mixed by a gate over sigma (the TD-LoRA file
  format's parametrisation), as the compensation that makes the reduced model match the full one.
- "coarse" (DDiT, trained alone): the coarse-patch embedding, de-embedding and patch-size identifier
  (`coarse.py`) and a rank-r block LoRA on every block linear that acts on coarse calls only; rows of the
  schedule's coarse steps run the Patch Scheduler's trained path (`coarse_tokens` / `coarse_output`).
- "tokens" (alone or with "td_lora"): a token router per block and a keep ratio per block and timestep
  region (`tokens.py`); `token_mode` "diffcr": only the kept image tokens run each block, as the Token
  Router's *diffcr* mode runs them; "sdt" (DyDiT): every token runs attention, only the kept ones the MLP.

The trainer speaks to the model only through the adapter: blocks run as `adapter.run_block` at full
width with `BlockInternals.linear_overrides` (the host block's own forward on module views, nothing
copied), the router reads `WidthUnits.timestep_features`, FLOPs come from the adapter's analytic counts.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from ..families import BlockInternals, BlockRef, CallLayout, ModelAdapter, UnsupportedModelError
from ..methods.patch_scheduler.coarse_path import coarse_layer_flops, coarse_output, coarse_placeholder, coarse_time, coarse_tokens
from ..methods.td_lora.binding import block_linear_index
from ..methods.td_lora.experts import sinusoidal_embedding
from ..methods.width.settings import default_group_count
from ..core.slicing import RunIndexCache
from ..methods.patch_scheduler.trainable import CoarseParts, coarse_step_indices, schedule_factor
from .checkpointing import checkpointed
from .objectives import gumbel_sigmoid
from .adapted_linear import AdaptedLinear
from ..methods.token_router.trainable import TOKEN_KINDS, RoutedStudent, TokenParts
from .trajectories import TRAINER_KEYS, Trajectories

PARTS = ("width", "td_lora", "coarse", "tokens")
WIDTH_PARTS = ("both", "heads", "mlp")


@dataclass(frozen=True)
class StudentSpec:
    """What the student learns."""

    parts: tuple[str, ...] = ("width", "td_lora")
    width_parts: str = "both"  # what the width router thins: "both", "heads" or "mlp"
    mlp_groups: int = 0  # MLP channel groups per block; 0 = the Width Patcher's default (`default_group_count`)
    experts: int = 2  # TD-LoRA K
    rank: int = 4
    gate_hidden: int = 32
    gate_embed: int = 64
    init_logit: float = 3.0  # router bias at the start: every unit kept (training starts from full compute)
    coarse_schedule: str = "0-70%:2"  # "coarse": the steps that run coarse (the Patch Scheduler's manual schedule)
    coarse_init: str = "area"  # "coarse": how the layers start ("area": the training-free path; "pinv_bilinear": DDiT's)
    ratio_regions: int = 4  # "tokens": timestep regions with their own keep ratios (equal spans of sigma percent)
    ratio_bins: int = 20  # "tokens": keep-ratio bins the training interpolates between (DiffCR)
    min_keep: float = 0.1  # "tokens": the lowest keep ratio a block may learn
    router_init: float = 4.0  # "tokens": router bias at the start (the kept tokens' update scaled by ~0.98)
    token_mode: str = "diffcr"  # "tokens": what a token left out skips, "diffcr" the block, "sdt" its MLP (DyDiT)

    def validate(self) -> None:
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown or not self.parts:
            raise ValueError(f"Trainer: parts must be a non-empty subset of {', '.join(PARTS)}, got {', '.join(self.parts) or 'none'}.")
        if self.width_parts not in WIDTH_PARTS:
            raise ValueError(f"Trainer: width parts must be one of {', '.join(WIDTH_PARTS)}, got '{self.width_parts}'.")
        if self.experts < 1 or self.rank < 1:
            raise ValueError(f"Trainer: TD-LoRA needs experts >= 1 and rank >= 1, got K={self.experts}, r={self.rank}.")
        if self.mlp_groups < 0:
            raise ValueError(f"Trainer: mlp_groups must be >= 0 (0 = one per head, or the nearest count that divides the MLP), got {self.mlp_groups}.")
        if "coarse" in self.parts:
            if len(self.parts) > 1:
                raise ValueError("Trainer: coarse patches are trained on their own (parts 'coarse' alone); train width "
                                 "and TD-LoRA in another run.")
            schedule_factor(self.coarse_schedule)
        if "tokens" in self.parts:
            if "width" in self.parts:
                raise ValueError("Trainer: token routers are trained without width (parts 'tokens' or 'tokens,td_lora'); "
                                 "train width in another run.")
            if self.ratio_regions < 1 or self.ratio_bins < 2:
                raise ValueError(f"Trainer: token routing needs ratio_regions >= 1 and ratio_bins >= 2, got "
                                 f"{self.ratio_regions} and {self.ratio_bins}.")
            if not 0.0 < self.min_keep <= 1.0:
                raise ValueError(f"Trainer: min_keep must be in (0, 1], got {self.min_keep}.")
            if self.token_mode not in TOKEN_KINDS:
                raise ValueError(f"Trainer: token_mode must be one of {', '.join(TOKEN_KINDS)}, got '{self.token_mode}'.")


class DynamicStudent(RoutedStudent, torch.nn.Module):
    """Trainable dynamic parts around a frozen host diffusion model (kept outside the module's parameters,
    so DistributedDataParallel and checkpoints see only the small trainable parts)."""

    def __init__(self, adapter: ModelAdapter, diffusion_model: torch.nn.Module, spec: StudentSpec,
                 feature_mean: torch.Tensor, feature_scale: float, seed: int = 0,
                 sigma_percent: Callable[[float], float] | None = None,
                 host_training: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        super().__init__()
        spec.validate()
        self.spec, self.adapter = spec, adapter
        self.host_training = host_training
        object.__setattr__(self, "diffusion_model", diffusion_model)  # not a submodule: frozen, never synced
        self.blocks: tuple[BlockRef, ...] = tuple(adapter.blocks)
        self.units = adapter.width_units()
        if self.units is None and "width" in spec.parts:
            raise UnsupportedModelError(f"Trainer: {adapter.display_name} models have no dynamic width, so no width router can be trained.")
        self.head_count = self.units.head_count if self.units is not None else 0
        self.group_count = (spec.mlp_groups or default_group_count(self.head_count, self.units.mlp_hidden)) if self.units is not None else 0
        if self.units is not None and self.units.mlp_hidden % self.group_count:
            raise ValueError(f"Trainer: {self.group_count} MLP groups do not divide the {self.units.mlp_hidden} MLP units.")
        self.group_size = self.units.mlp_hidden // self.group_count if self.units is not None else 0
        self.thin_heads = "width" in spec.parts and spec.width_parts in ("both", "heads")
        self.thin_mlp = "width" in spec.parts and spec.width_parts in ("both", "mlp")
        self.time_scale = adapter.model_info().timestep_scale  # the TD-LoRA gate embeds sigma as the file will
        generator = torch.Generator().manual_seed(seed)
        features, blocks = int(feature_mean.shape[-1]), len(self.blocks)
        # Router features are normalised while training ((f - mean) / scale), folded into the file's W, b.
        self.register_buffer("feature_mean", feature_mean.detach().float().clone())
        self.register_buffer("feature_scale", torch.tensor(float(feature_scale)))
        if self.thin_heads:
            self.head_weight = torch.nn.Parameter(torch.randn(blocks, self.head_count, features, generator=generator) * 0.01)
            self.head_bias = torch.nn.Parameter(torch.full((blocks, self.head_count), spec.init_logit))
        if self.thin_mlp:
            self.group_weight = torch.nn.Parameter(torch.randn(blocks, self.group_count, features, generator=generator) * 0.01)
            self.group_bias = torch.nn.Parameter(torch.full((blocks, self.group_count), spec.init_logit))
        self.coarse: CoarseParts | None = None
        self.tokens: TokenParts | None = None
        if "tokens" in spec.parts:
            if sigma_percent is None:
                raise ValueError("Trainer: token routing needs the model's sigma -> percent map (its ratio regions are over it).")
            self.sigma_percent = sigma_percent
            self.tokens = TokenParts(adapter, adapter.model_info().hidden_size, spec.ratio_regions, spec.ratio_bins,
                                     spec.min_keep, spec.router_init, generator, kind=spec.token_mode)
        if "coarse" in spec.parts:
            grid = adapter.coarse_grid()
            if grid is None or not grid.trained_embedding:
                raise UnsupportedModelError(f"Trainer: {adapter.display_name} models take no trained coarse-patch embedding.")
            self.grid = grid
            self.coarse_schedule, factor = schedule_factor(spec.coarse_schedule)
            self.coarse = CoarseParts(grid, diffusion_model, factor, spec.coarse_init)
        self.lora_paths: dict[str, tuple[BlockRef, str]] = {}
        self.lora_down = torch.nn.ParameterDict()
        self.lora_up = torch.nn.ParameterDict()
        if "td_lora" in spec.parts or "coarse" in spec.parts:
            k, r = (spec.experts if "td_lora" in spec.parts else 1), spec.rank
            for path, (block, name, layer) in block_linear_index(adapter, diffusion_model).items():
                out_features, in_features = layer.weight.shape
                key = path.replace(".", "/")
                self.lora_paths[key] = (block, name)
                # A random, B zero: the bypass starts at exactly zero (the student starts as the teacher)
                self.lora_down[key] = torch.nn.Parameter(torch.randn(k * r, in_features, generator=generator) / math.sqrt(in_features))
                self.lora_up[key] = torch.nn.Parameter(torch.zeros(out_features, k * r))
            if k > 1 and "td_lora" in spec.parts:
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
        self._columns = {block: self.units.unit_columns(block) for block in self.blocks} if "width" in spec.parts else {}
        self._coefficients: dict[CallLayout, tuple[float, torch.Tensor, torch.Tensor, float]] = {}
        self._coarse_ratios: dict[tuple, float] = {}  # call shapes -> FLOPs ratio of a coarse call
        self._token_flops: dict[tuple, float] = {}  # (layout, block position, image tokens) -> FLOPs per sample
        self._percents: dict[float, float] = {}
        # keep only each block's inputs for backward and recompute the rest (set by the trainer for a run)
        self.gradient_checkpointing = False

    @property
    def learns_compute(self) -> bool:
        """Whether training decides the FLOPs (width routers, keep ratios); coarse steps are fixed by their schedule."""
        return "width" in self.spec.parts or "tokens" in self.spec.parts

    # --- model calls ------------------------------------------------------------------------------
    def latent(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return inputs[self.adapter.latent_argument]

    def timestep(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return inputs[self.adapter.timestep_argument]

    def arguments(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The recorded model-call arguments of a batch (by the host's parameter names), with the ones the adapter
        derives from them."""
        tensors = {k: v for k, v in inputs.items() if k not in TRAINER_KEYS}
        return {**tensors, **self.adapter.derived_arguments(tensors)}

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
        embedding = sinusoidal_embedding(sigmas.float(), self.spec.gate_embed, self.time_scale)
        gates = torch.softmax(self.gate(embedding), dim=-1)
        return gates.repeat_interleave(self.spec.rank, dim=1)

    # --- FLOPs --------------------------------------------------------------------------------------
    def flop_coefficients(self, layout: CallLayout) -> tuple[float, torch.Tensor, torch.Tensor, float]:
        """A call's FLOPs as base + sum_b (a_b * heads kept_b + c_b * groups kept_b), per sample, with the
        TD-LoRA bypasses included (their in/out sizes shrink with the width, as the sliced bypass does),
        and the full model's FLOPs per sample. Exact: every term is linear in the kept heads and groups."""
        found = self._coefficients.get(layout)
        if found is not None:
            return found
        adapter, one = self.adapter, replace(layout, batch=1)
        base = adapter.stem_flops(one).total
        per_head, per_group = [], []
        heads, groups = max(self.head_count, 1), max(self.group_count, 1)
        for block in self.blocks:
            def flops(kept_heads: int, kept_groups: int) -> float:
                work = adapter.full_block_work(block, one)
                if self.units is not None:
                    work = replace(work, heads=kept_heads, mlp_hidden=kept_groups * self.group_size)
                return adapter.block_flops(block, replace(work, extra_flops=self._lora_flops(block, work))).total

            full = flops(heads, groups)
            a = (full - flops(0, groups)) / heads if self.units is not None else 0.0
            c = (full - flops(heads, 0)) / groups if self.units is not None else 0.0
            base += full - a * heads - c * groups
            per_head.append(a)
            per_group.append(c)
        found = (base, torch.tensor(per_head), torch.tensor(per_group), adapter.full_flops(one).total)
        self._coefficients[layout] = found
        return found

    def _lora_flops(self, block: BlockRef, work: Any) -> float:
        layers = self._by_block.get(block)
        if not layers:
            return 0.0
        if self.units is None:
            raise UnsupportedModelError(f"Trainer: {self.adapter.display_name} does not describe its block linears for the FLOPs count.")
        experts = self.spec.experts if "td_lora" in self.spec.parts else 1
        sizes, columns = self.units.linear_sizes(block, work), experts * self.spec.rank
        return sum(2.0 * sizes[name][0] * columns * (sizes[name][1] + sizes[name][2]) for name in layers)

    def flops_ratio(self, layout: CallLayout, heads: torch.Tensor | None, groups: torch.Tensor | None) -> torch.Tensor:
        """(B,) differentiable FLOPs of each sample's call over the full model's."""
        base, per_head, per_group, full = self.flop_coefficients(layout)
        batch, shape = layout.batch, (layout.batch, len(self.blocks))
        head_count = heads.sum(-1) if heads is not None else torch.full(shape, float(max(self.head_count, 1)))
        group_count = groups.sum(-1) if groups is not None else torch.full(shape, float(max(self.group_count, 1)))
        flops = base + (head_count * per_head.to(head_count)).sum(-1) + (group_count * per_group.to(group_count)).sum(-1)
        return (flops / full).expand(batch)

    # --- the forward --------------------------------------------------------------------------------
    def forward(self, inputs: Mapping[str, torch.Tensor], temperature: float = 1.0, noise: float = 1.0,
                generator: torch.Generator | None = None, record_blocks: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's model output for a batch of recorded model inputs, and its (B,) FLOPs ratios."""
        with self.host_training():  # the host's code paths autograd can go through
            return self._student_output(inputs, temperature, noise, generator, record_blocks)

    def _student_output(self, inputs: Mapping[str, torch.Tensor], temperature: float, noise: float,
                        generator: torch.Generator | None, record_blocks: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.coarse is not None:
            return self._coarse_forward(inputs, record_blocks)
        if self.tokens is not None:
            return self._routed_forward(inputs, record_blocks)
        arguments = self.arguments(inputs)
        heads, groups = self.masks(self.timestep(inputs), self.latent(inputs).dtype, temperature, noise, generator)
        columns = self.lora_columns(inputs["sigmas"])
        layout = self.adapter.call_layout(arguments)
        state = {"layout": layout, "cache": RunIndexCache()}
        patches = {self.adapter.patch_key(b): self._block_patch(i, b, heads, groups, columns, state, record_blocks)
                   for i, b in enumerate(self.blocks)}
        options = {"patches_replace": {"dit": patches}, "sigmas": inputs["sigmas"]}
        out = self.diffusion_model(**arguments, transformer_options=options)
        return out, self.flops_ratio(layout, heads, groups)

    # --- coarse patches (DDiT) ---------------------------------------------------------------------
    def _coarse_forward(self, inputs: Mapping[str, torch.Tensor],
                        record: list | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A coarse call as the Patch Scheduler's trained path runs it, through the host's blocks with the
        block LoRA; returns the native-resolution velocity and the (B,) FLOPs ratio of the call."""
        arguments = self.arguments(inputs)
        grid, factor, latent = self.grid, self.coarse.factor, self.adapter.latent_argument
        x = arguments[latent]
        layers = self.coarse.layers(x)
        t = grid.flow_time(arguments)
        tokens, placeholder = coarse_tokens(grid, x, layers, factor, t)
        coarse_arguments = {**arguments, latent: placeholder, **grid.with_flow_time(arguments, coarse_time(t, factor)[1])}
        layout = self.adapter.call_layout(coarse_arguments)
        state = {"layout": layout, "cache": RunIndexCache()}
        capture = {"count": tokens.shape[1]}
        patches = {self.adapter.patch_key(b): self._block_patch(i, b, None, None, None, state, record,
                                                                capture if b == grid.last_block else None)
                   for i, b in enumerate(self.blocks)}
        options = grid.coarse_options({"patches_replace": {"dit": patches}, "sigmas": inputs["sigmas"]}, factor,
                                      post_input=lambda embedded: grid.replace_image_tokens(embedded, tokens))
        self.diffusion_model(**coarse_arguments, transformer_options=options)
        out = coarse_output(grid, self.diffusion_model, capture["hidden"], capture["conditioning"], layers, x, factor, t)
        return out, torch.tensor(self.coarse_call_ratio(arguments, x)).expand(x.shape[0])

    def coarse_call_ratio(self, arguments: Mapping[str, torch.Tensor], x: torch.Tensor) -> float:
        """FLOPs of one coarse call per sample (blocks on the coarse grid with the block LoRA, the trained
        layers) over the native call's; the shapes decide it, so it is computed once per shape of the call."""
        key = tuple((name, tuple(value.shape[1:])) for name, value in arguments.items() if isinstance(value, torch.Tensor))
        found = self._coarse_ratios.get(key)
        if found is not None:
            return found
        grid, factor = self.grid, self.coarse.factor
        native = replace(self.adapter.call_layout(arguments), batch=1)
        placeholder = coarse_placeholder(grid, x[:1], factor)
        coarse = replace(self.adapter.call_layout({**arguments, self.adapter.latent_argument: placeholder}), batch=1)
        with torch.no_grad():
            blocks = float(self.flops_ratio(coarse, None, None)[0]) * self.adapter.full_flops(coarse).total
            layers = coarse_layer_flops(grid, x[:1], self.coarse.layers(), factor)
        found = self._coarse_ratios[key] = (blocks + layers) / self.adapter.full_flops(native).total
        return found

    def coarse_run_ratio(self, bank: Trajectories) -> float:
        """The FLOPs ratio of a whole run of the bank's schedule: coarse steps at the coarse call's ratio."""
        rows = bank.fixed(1)
        steps = len(bank.timesteps)
        coarse = len(coarse_step_indices(self.coarse_schedule, steps))
        call = self.coarse_call_ratio(self.arguments(rows), self.latent(rows))
        return (coarse * call + (steps - coarse)) / max(steps, 1)

    def changed_timesteps(self, bank: Trajectories) -> list[float] | None:
        """The timesteps of the bank's schedule whose calls the student changes (coarse: the schedule's coarse
        steps), or None for every call."""
        if self.coarse is None:
            return None
        return [bank.timesteps[s] for s in coarse_step_indices(self.coarse_schedule, len(bank.timesteps))]

    def coarse_training_rows(self, bank: Trajectories) -> Trajectories:
        """The bank's rows at the schedule's coarse steps (the only calls the coarse parts change)."""
        timesteps = self.changed_timesteps(bank)
        if not timesteps:
            raise ValueError(f"Trainer: the coarse schedule '{self.spec.coarse_schedule}' runs no step of the "
                             f"{len(bank.timesteps)}-step teacher runs coarse.")
        return bank.restricted(timesteps)

    def _mask(self, block: BlockRef, name: str, i: int, heads: torch.Tensor | None, groups: torch.Tensor | None,
              in_features: int) -> torch.Tensor | None:
        """(B, in_features) keep mask of linear `name`'s input columns, or None (no unit feeds it, or none is thinned)."""
        spans = self._columns.get(block, {}).get(name)
        gates = {"heads": heads, "groups": groups}
        if not spans or all(gates[kind] is None for kind, _, _ in spans):
            return None
        live = next(g for g in gates.values() if g is not None)
        batch, device = live.shape[0], live.device
        pieces, at = [], 0
        for kind, start, width in sorted(spans, key=lambda span: span[1]):
            if start > at:
                pieces.append(torch.ones(batch, start - at, device=device))
            gate = gates[kind]
            if gate is None:
                pieces.append(torch.ones(batch, width, device=device))
            else:  # each unit's gate over its columns
                pieces.append(gate[:, i].repeat_interleave(width // gate.shape[-1], dim=-1))
            at = start + width
        if at < in_features:
            pieces.append(torch.ones(batch, in_features - at, device=device))
        return torch.cat(pieces, dim=-1)

    def _block_patch(self, i: int, block: BlockRef, heads: torch.Tensor | None, groups: torch.Tensor | None,
                     columns: torch.Tensor | None, state: dict, record: list | None,
                     capture: dict | None = None) -> Callable[[dict, dict], dict]:
        names = self._by_block.get(block, {})
        gated = self.tokens.gated_linears.get(block, ()) if self.tokens is not None else ()
        adapted = set(names) | set(self._columns.get(block, {})) | set(gated)
        sdt: dict[str, Any] = {}  # an SDT call's (token weights, MLP gates) while it runs
        # the decisions the block reads (tensors with gradients computed outside it); a checkpointed call swaps in
        # its own inputs for them
        decisions = {"heads": heads, "groups": groups, "columns": columns}

        def override(name: str) -> Callable[[torch.nn.Module], Callable]:
            def build(layer: torch.nn.Module) -> Callable:
                key = names.get(name)
                lora = (self.lora_down[key], self.lora_up[key]) if key is not None else None
                mask = self._mask(block, name, i, decisions["heads"], decisions["groups"], int(layer.weight.shape[1]))
                def token_weights() -> tuple[torch.Tensor, Any] | None:
                    return (sdt["weights"], sdt["gates"][name]) if "weights" in sdt and name in sdt["gates"] else None

                return AdaptedLinear(layer, lora, decisions["columns"] if lora is not None else None, mask,
                                     token_weights if name in gated else None)
            return build

        internals = BlockInternals(linear_overrides={name: override(name) for name in adapted})

        def patch(args: dict, extra: dict) -> dict:
            module = self.adapter.block_module(self.diffusion_model, block)
            layout = state["layout"] = self.adapter.block_layout(block, args, state["layout"])

            def run(block_args: Mapping[str, Any], weighted: tuple[torch.Tensor, Mapping] | None = None) -> dict:
                if weighted is None:
                    return self.adapter.run_block(module, block, block_args, internals, [], layout, state["cache"])
                sdt["weights"], sdt["gates"] = weighted
                try:
                    return self.adapter.run_block(module, block, block_args, internals, [], layout, state["cache"])
                finally:
                    sdt.clear()

            training = torch.is_grad_enabled()  # decided here: a checkpointed block runs its forward without autograd
            if "ratio" in state:
                decisions["ratio"] = state["ratio"][i]

            def block_call(block_args: Mapping[str, Any]) -> dict:
                if "ratio" in decisions:
                    return self.tokens.run(i, block, block_args, layout, decisions["ratio"], run, interpolate=training)
                return run(block_args)

            if self.gradient_checkpointing and training:
                out = checkpointed(block_call, args, decisions, self.host_training)
            else:
                out = block_call(args)
            if record is not None:
                record.append(self.adapter.hidden_states(block, out))
            if capture is not None:  # the last block of a coarse call: what the trained de-embedding reads
                capture["hidden"] = self.grid.image_hidden(block, out, state["layout"], capture["count"])
                capture["conditioning"] = self.grid.final_conditioning(args)
            return out

        return patch

