"""DiffCR's trainable parts: a token router per block and a keep ratio per block and timestep region.

The reasoning and the equations: docs/methods/token_router.md.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ...core.method import LinearPieces, TrainablePart, register_part
from ...core.slicing import gather_tokens
from ...families import BlockRef, CallLayout, MlpTokenGate, UnsupportedModelError
from .file import region_of, router_flops, router_scores, save_router_file
from .settings import keep_count

if TYPE_CHECKING:
    from ...training.student import DynamicStudent, StudentCall, StudentContext, StudentSpec
    from ...training.trajectories import Trajectories

BlockRun = Callable[..., dict]  # run_block(args) or, for SDT, run_block(args, (token weights, MLP gates))
TOKEN_KINDS = ("diffcr", "sdt")
FILE_ROUTER = {"diffcr": "diffcr", "sdt": "dydit"}  # the token-router file's router kind of each


def token_rows(weights: torch.Tensor, gate: MlpTokenGate, rows: int) -> torch.Tensor:
    """(B, rows, 1) multiplier of a linear's input or output rows: the image tokens' weights (B, N) from
    `gate.first_row` on, 1 for every other row (text)."""
    batch, tokens = weights.shape
    before, after = gate.first_row, rows - gate.first_row - tokens
    pieces = [weights.new_ones(batch, before)] if before else []
    pieces.append(weights)
    if after:
        pieces.append(weights.new_ones(batch, after))
    return torch.cat(pieces, dim=1)[..., None]


def weighted_mlp(x: torch.Tensor, weights: torch.Tensor, gate: MlpTokenGate,
                 linear: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`linear(x)` with each image token's MLP update weighted (SDT training): its MLP input columns when the
    linear also reads the attention (the bias stays, as a skipped token keeps it), else its whole output."""
    if gate.columns is None:
        return linear(x) * token_rows(weights, gate, x.shape[1]).to(x.dtype)
    first, count = gate.columns
    scaled = x[..., first:first + count] * token_rows(weights, gate, x.shape[1]).to(x.dtype)
    return linear(torch.cat((x[..., :first], scaled, x[..., first + count:]), dim=-1))


@register_part
class TokenPart(TrainablePart):
    """Per-block token routers and per-region, per-block keep ratios (trainable); rows run grouped by ratio region."""

    part, order, learns_compute = "tokens", 40, True
    not_with = ("width",)
    refusal = "Trainer: token routers are trained without width (parts 'tokens' or 'tokens,td_lora'); train width in another run."
    file_suffix = ".token_router.safetensors"
    spec_fields = ("ratio_regions", "ratio_bins", "min_keep", "router_init", "token_mode")

    @classmethod
    def check(cls, spec: "StudentSpec") -> None:
        if spec.ratio_regions < 1 or spec.ratio_bins < 2:
            raise ValueError(f"Trainer: token routing needs ratio_regions >= 1 and ratio_bins >= 2, got "
                             f"{spec.ratio_regions} and {spec.ratio_bins}.")
        if not 0.0 < spec.min_keep <= 1.0:
            raise ValueError(f"Trainer: min_keep must be in (0, 1], got {spec.min_keep}.")
        if spec.token_mode not in TOKEN_KINDS:
            raise ValueError(f"Trainer: token_mode must be one of {', '.join(TOKEN_KINDS)}, got '{spec.token_mode}'.")

    def __init__(self, context: "StudentContext") -> None:
        super().__init__()
        adapter, spec, generator = context.adapter, context.spec, context.generator
        if context.sigma_percent is None:
            raise ValueError("Trainer: token routing needs the model's sigma -> percent map (its ratio regions are over it).")
        routing = adapter.token_routing()
        if routing is None:
            raise UnsupportedModelError(f"Trainer: {adapter.display_name} models cannot route tokens, so no token router can be trained.")
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "adapter", adapter)
        self.sigma_percent = context.sigma_percent
        hidden_size, blocks, regions = adapter.model_info().hidden_size, len(adapter.blocks), spec.ratio_regions
        self.kind, self.bins, self.min_keep = spec.token_mode, spec.ratio_bins, spec.min_keep
        if self.kind == "sdt":
            try:  # names only (a placeholder layout): the linears the student's block views must hand to it
                self.gated_linears = {b: tuple(routing.mlp_token_gates(b, CallLayout(1, 1, 0))) for b in adapter.blocks}
            except NotImplementedError as error:
                raise UnsupportedModelError(f"Trainer: {adapter.display_name} models cannot train SDT token routers ({error}).") from None
            width = max(1, hidden_size // 16)  # DyDiT's router width, D / 16
            self.fc1_weight = torch.nn.Parameter(torch.randn(blocks, width, hidden_size, generator=generator) / math.sqrt(hidden_size))
            self.fc1_bias = torch.nn.Parameter(torch.zeros(blocks, width))
            self.fc2_weight = torch.nn.Parameter(torch.randn(blocks, width, generator=generator) / math.sqrt(width))
            self.fc2_bias = torch.nn.Parameter(torch.zeros(blocks))  # logit 0: the straight-through gradient at its largest
        else:
            self.gated_linears = {}
            self.router_weight = torch.nn.Parameter(torch.randn(blocks, hidden_size, generator=generator) * (0.1 / math.sqrt(hidden_size)))
            self.router_bias = torch.nn.Parameter(torch.full((blocks,), float(spec.router_init)))
        self.ratio = torch.nn.Parameter(torch.ones(regions, blocks))
        self.register_buffer("bounds", torch.linspace(0.0, 1.0, regions + 1))
        self._percents: dict[float, float] = {}
        self._flops: dict[tuple, float] = {}  # (layout, block position, image tokens) -> FLOPs per sample

    def region(self, percent: float) -> int:
        """The ratio region of sigma percent `percent` (the Token Router's rule for a file's regions)."""
        return region_of(self.bounds, percent)

    @torch.no_grad()
    def project_(self) -> None:
        """Keep every ratio in [min_keep, 1] after an optimiser step (projected gradient descent)."""
        self.ratio.clamp_(self.min_keep, 1.0)

    def split(self, ratio: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """The bins around a ratio: (lo, hi, alpha) with alpha differentiable in the ratio (ratio 1 is the
        top of the last bin, alpha = 1, so training starts from full compute with a gradient)."""
        scaled = ratio * self.bins
        lo_bin = min(math.floor(float(scaled.detach()) + 1e-6), self.bins - 1)
        return lo_bin / self.bins, (lo_bin + 1) / self.bins, scaled - lo_bin

    def run(self, position: int, block: BlockRef, args: Mapping[str, Any], layout: CallLayout, ratio: torch.Tensor,
            run_block: BlockRun, interpolate: bool) -> dict:
        """One block call at keep ratio `ratio` (a 0-d tensor shared by the rows of the call): interpolated
        between the ratio bins in training, else exactly as inference runs it."""
        routing = self.routing
        x = routing.image_tokens(block, args, layout)
        tokens = x.shape[1]
        if interpolate:
            lo, hi, alpha = self.split(ratio)
            k_lo, k_hi = keep_count(lo, tokens), keep_count(hi, tokens)
        else:
            k_lo = k_hi = keep_count(float(ratio), tokens)
            alpha = torch.zeros(())
        if k_lo >= tokens:  # every token kept: the full block, no router (as the Token Router runs it)
            return run_block(args)
        if self.kind == "sdt":
            return self._run_sdt(position, block, args, layout, x, k_lo, k_hi, alpha, run_block)
        scores = router_scores("diffcr", self.block_router(position), x.float())  # (B, N)
        ranked = torch.topk(scores.detach(), k_hi, dim=1).indices  # best first
        index, order = ranked.sort(dim=1)  # spatial order, as the Token Router gathers them
        rank = order.argsort(dim=1)  # each gathered token's place in the ranking
        kept_scores = scores.gather(1, index)
        # each token's update weight at the two bins (s for a routed block's kept tokens, 1 for a full block,
        # 0 for a token left out), interpolated
        at_lo = torch.where(rank < k_lo, kept_scores, torch.zeros_like(kept_scores))
        at_hi = torch.ones_like(kept_scores) if k_hi >= tokens else kept_scores
        alpha = alpha.to(x.device)
        gate = (1 - alpha) * at_lo + alpha * at_hi
        kept_input = gather_tokens(x, index)
        reduced = run_block(routing.select(block, args, index, layout))
        kept_output = routing.image_tokens(block, reduced, layout)
        updated = kept_input + gate[..., None].to(kept_output.dtype) * (kept_output - kept_input)
        kept_output.copy_(updated)
        return routing.merge(block, args, reduced, index, layout)

    def _run_sdt(self, position: int, block: BlockRef, args: Mapping[str, Any], layout: CallLayout, x: torch.Tensor,
                 k_lo: int, k_hi: int, alpha: torch.Tensor, run_block: BlockRun) -> dict:
        """Every token through the block, each image token's MLP update weighted by its decision (see the module)."""
        logits = router_scores("dydit", self.block_router(position), x.float())
        soft = torch.sigmoid(logits)
        ranked = torch.topk(logits.detach(), k_hi, dim=1).indices  # best first
        at_hi = torch.ones_like(soft) if k_hi >= x.shape[1] else torch.zeros_like(soft).scatter_(1, ranked, 1.0)
        at_lo = torch.zeros_like(soft).scatter_(1, ranked[:, :k_lo], 1.0)
        alpha = alpha.to(x.device)
        weights = (1 - alpha) * at_lo + alpha * at_hi + (soft - soft.detach())
        return run_block(args, (weights, self.routing.mlp_token_gates(block, layout)))

    def block_router(self, position: int) -> dict[str, torch.Tensor]:
        """Block `position`'s router as the file holds it (`FILE_ROUTER` kind's names and shapes; views of the
        trainable parameters): what scoring, its FLOPs and the export all read."""
        if self.kind == "sdt":
            return {"fc1.weight": self.fc1_weight[position], "fc1.bias": self.fc1_bias[position],
                    "fc2.weight": self.fc2_weight[position:position + 1], "fc2.bias": self.fc2_bias[position:position + 1]}
        return {"weight": self.router_weight[position:position + 1], "bias": self.router_bias[position:position + 1]}

    def router_parameters(self) -> list[torch.nn.Parameter]:
        return ([self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias] if self.kind == "sdt"
                else [self.router_weight, self.router_bias])

    def scoring_flops(self, tokens: int) -> float:
        """Matmul FLOPs of one block's router scoring `tokens` tokens (what the Token Router counts for the file)."""
        return router_flops(FILE_ROUTER[self.kind], self.block_router(0), tokens)

    def output_anchor(self) -> torch.Tensor:
        """0 with a gradient path to the routers: a step where every block ran in full (ratio 1) leaves them
        out of the graph, which DistributedDataParallel (find_unused_parameters=False) refuses."""
        return sum(p.sum() for p in self.router_parameters()) * 0.0

    def block_flops(self, ratio: torch.Tensor | float, flops_at: Callable[[int], float], router_flops: float,
                    tokens: int, grad: bool) -> torch.Tensor | float:
        """A block's FLOPs at keep ratio `ratio`: interpolated between the bins (differentiable) with `grad`,
        else exactly what inference runs (k = ceil(r N), the full block without router at ratio 1)."""
        if not grad:
            k = keep_count(float(ratio), tokens)
            return flops_at(tokens) if k >= tokens else flops_at(k) + router_flops
        lo, hi, alpha = self.split(ratio)
        k_lo, k_hi = keep_count(lo, tokens), keep_count(hi, tokens)
        if k_lo >= tokens:
            return torch.tensor(flops_at(tokens))
        at_hi = flops_at(tokens) if k_hi >= tokens else flops_at(k_hi) + router_flops
        return (1 - alpha) * (flops_at(k_lo) + router_flops) + alpha * at_hi

    def export(self, labels: list[str]) -> tuple[dict[str, dict[str, torch.Tensor]], torch.Tensor, torch.Tensor]:
        """The file's routers (label -> `block_router`), ratios (regions, blocks) and bounds."""
        routers = {label: {name: value.detach().float().cpu().clone() for name, value in self.block_router(i).items()}
                   for i, label in enumerate(labels)}
        ratios = self.ratio.detach().float().cpu().clamp(self.min_keep, 1.0)
        return routers, ratios, self.bounds.detach().float().cpu()

    # --- the student's calls ----------------------------------------------------------------------
    def percent(self, sigma: float) -> float:
        found = self._percents.get(sigma)
        if found is None:
            found = self._percents[sigma] = float(self.sigma_percent(sigma))
        return found

    def forward_call(self, student: "DynamicStudent", call: "StudentCall") -> tuple[torch.Tensor, torch.Tensor]:
        """Rows grouped by ratio region (one keep count per block call, as at inference), each group through
        the blocks at its region's ratios; outputs and (B,) FLOPs ratios back in row order."""
        inputs = call.inputs
        regions = torch.tensor([self.region(self.percent(s)) for s in inputs["sigmas"].tolist()])
        outputs, ratios, order = [], [], []
        for region in regions.unique().tolist():
            rows = (regions == region).nonzero().squeeze(1)
            group = student.call({name: value[rows.to(value.device)] for name, value in inputs.items()},
                                 temperature=call.temperature, noise=call.noise, generator=call.generator, record=call.record)
            ratio = group.scratch["ratios"] = self.ratio[region]
            outputs.append(student.run_model(group))
            call_ratio = self.call_ratio_at(student, group.layout, ratio, grad=torch.is_grad_enabled())  # exact when not training
            ratios.append(torch.as_tensor(call_ratio, dtype=torch.float32).expand(len(rows)))
            order.append(rows)
        back = torch.argsort(torch.cat(order))
        out = torch.cat(outputs)[back.to(outputs[0].device)] + self.output_anchor()
        return out, torch.cat(ratios)[back]

    def enter_block(self, call: "StudentCall", position: int) -> None:
        if "ratios" in call.scratch:
            call.decisions["ratio"] = call.scratch["ratios"][position]

    def wrap_block(self, call: "StudentCall", position: int, block: BlockRef, args: dict, run: Callable[[Mapping[str, Any]], dict],
                   training: bool) -> dict:
        if call.decisions.get("ratio") is None:
            return run(args)

        def run_block(block_args: Mapping[str, Any], weighted: tuple[torch.Tensor, Mapping] | None = None) -> dict:
            if weighted is None:
                return run(block_args)
            call.scratch["sdt"] = weighted  # read by the gated linears while the block runs
            try:
                return run(block_args)
            finally:
                del call.scratch["sdt"]

        return self.run(position, block, args, call.layout, call.decisions["ratio"], run_block, interpolate=training)

    def linears(self, block: BlockRef) -> tuple[str, ...]:
        return tuple(self.gated_linears.get(block, ()))

    def adapt_linear(self, call: "StudentCall", position: int, block: BlockRef, name: str, layer: torch.nn.Module,
                     pieces: LinearPieces) -> None:
        if name not in self.gated_linears.get(block, ()):
            return

        def token_weights() -> tuple[Callable, torch.Tensor, MlpTokenGate] | None:
            sdt = call.scratch.get("sdt")
            return (weighted_mlp, sdt[0], sdt[1][name]) if sdt is not None and name in sdt[1] else None

        pieces.token_weights = token_weights

    def check_training(self, config: Any) -> None:
        if config.feature_weight > 0:
            raise ValueError("Trainer: feature distillation is not available with token routing (its rows run in groups "
                             "by timestep region); train token routers with feature_weight 0.")

    def decision_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())

    def after_step(self) -> None:
        self.project_()  # keep ratios stay in [min_keep, 1]

    # --- FLOPs --------------------------------------------------------------------------------------
    def call_ratio_at(self, student: "DynamicStudent", layout: CallLayout, ratio: torch.Tensor, grad: bool) -> Any:
        """FLOPs of one call per sample with the blocks at keep ratios `ratio` (blocks,) over the full call's
        (router scoring and the other parts' additions on the kept tokens included); differentiable with `grad`,
        else a float: exactly what inference runs."""
        one = replace(layout, batch=1)
        tokens = one.routable_tokens
        scoring = self.scoring_flops(tokens)
        total: Any = self.adapter.stem_flops(one).total
        for i, block in enumerate(self.adapter.blocks):
            total = total + self.block_flops(ratio[i] if grad else float(ratio[i]),
                                             lambda k, i=i, block=block: self._flops_at(student, one, i, block, k),
                                             scoring, tokens, grad)
        return total / student.full_flops(one)

    def _flops_at(self, student: "DynamicStudent", one: CallLayout, position: int, block: BlockRef, image_tokens: int) -> float:
        key = (one, position, image_tokens)
        found = self._flops.get(key)
        if found is None:
            reduced = "mlp_image_tokens" if self.kind == "sdt" else "image_tokens"  # SDT: only the MLP thins
            work = replace(self.adapter.full_block_work(block, one), **{reduced: image_tokens + one.reference_tokens})
            found = self._flops[key] = student.block_flops(block, work)
        return found

    def run_ratio(self, student: "DynamicStudent", bank: "Trajectories", *, grad: bool = False, **ignored: Any) -> Any:
        """The FLOPs ratio of a whole run of the bank's schedule: every step at its region's ratios."""
        rows = bank.fixed(1)
        layout = replace(self.adapter.call_layout(student.arguments(rows)), batch=1)
        with torch.set_grad_enabled(grad):
            steps = [self.call_ratio_at(student, layout, self.ratio[self.region(self.percent(sigma))], grad)
                     for sigma in bank.step_sigmas()]
        return sum(steps) / len(steps)

    # --- the file ---------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {"ratio_bins": str(self.bins), "min_keep": f"{self.min_keep:g}", "token_mode": self.kind}

    def save(self, student: "DynamicStudent", path: Any, metadata: dict[str, str]) -> None:
        routers, ratios, bounds = self.export([block.label for block in self.adapter.blocks])
        save_router_file(path, self.adapter, FILE_ROUTER[self.kind], routers, ratios, bounds, metadata=metadata)


__all__ = ["FILE_ROUTER", "TOKEN_KINDS", "TokenPart", "token_rows", "weighted_mlp"]
