"""DDiT's trainable parts: the coarse-patch embedding and de-embedding with the patch-size identifier, and a
rank-r block LoRA on every block linear that acts on coarse calls only.

The reasoning and the equations: docs/methods/patch_scheduler.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ...core.method import LinearPieces, TrainablePart, register_part
from ...families import BlockRef, UnsupportedModelError
from ...families.coarse import CoarseGrid
from ...training.low_rank import LowRankBank
from .coarse_path import coarse_layer_flops, coarse_output, coarse_placeholder, coarse_time, coarse_tokens
from .file import CoarseLayers, derived_layers, save_patch_embedding_file
from .schedule import ScheduleRange, parse_schedule, range_of_step

if TYPE_CHECKING:
    from ...training.student import DynamicStudent, StudentCall, StudentContext, StudentSpec
    from ...training.trajectories import Trajectories

INITIALISATIONS = ("area", "pinv_bilinear")


def schedule_factor(text: str) -> tuple[tuple[ScheduleRange, ...], int]:
    """The parsed manual schedule and its one coarse factor; ValueError for none or several."""
    schedule = parse_schedule(text)
    factors = sorted({r.factor for r in schedule if r.factor > 1})
    if len(factors) != 1:
        raise ValueError(
            f"Trainer: the coarse schedule '{text}' must name exactly one coarse factor (e.g. '0-70%:2'), "
            f"it names {', '.join(f'{f}x' for f in factors) or 'none'}."
        )
    return schedule, factors[0]


def coarse_step_indices(schedule: Sequence[ScheduleRange], steps: int) -> list[int]:
    """Steps s of a run of `steps` that the schedule runs coarse (the Patch Scheduler's manual rule)."""
    return [step for step in range(steps) if (found := range_of_step(schedule, step, steps)) is not None and found.factor > 1]


class CoarseParts(torch.nn.Module):
    """The embedding, de-embedding and patch-size identifier of one coarse factor (float32 parameters)."""

    def __init__(self, grid: CoarseGrid, diffusion_model: torch.nn.Module, factor: int, init: str = "area") -> None:
        super().__init__()
        if init not in INITIALISATIONS:
            raise ValueError(f"Trainer: coarse initialisation must be one of {', '.join(INITIALISATIONS)}, got '{init}'.")
        embed, final = grid.native_linears(diffusion_model)

        def weights(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            bias = getattr(layer, "bias", None)
            return layer.weight.detach().float().cpu(), bias.detach().float().cpu() if bias is not None else None

        layers = derived_layers(*weights(embed), *weights(final), grid.native_patch, factor, init)
        self.factor = factor
        self.embed_weight = torch.nn.Parameter(layers.embed_weight.clone())
        self.embed_bias = torch.nn.Parameter(layers.embed_bias.clone())
        self.patch_id = torch.nn.Parameter(layers.patch_id.clone())
        self.deembed_weight = torch.nn.Parameter(torch.zeros_like(layers.deembed_weight))
        self.deembed_bias = torch.nn.Parameter(torch.zeros_like(layers.deembed_bias))

    def layers(self, like: torch.Tensor | None = None) -> CoarseLayers:
        """The parameters as the Patch Scheduler's layers (differentiable; cast to `like`'s dtype when given)."""
        tensors = (self.embed_weight, self.embed_bias, self.patch_id, self.deembed_weight, self.deembed_bias)
        if like is not None:
            tensors = tuple(t.to(like.dtype) for t in tensors)
        return CoarseLayers(*tensors)


@register_part
class CoarsePart(TrainablePart):
    """Rows of the schedule's coarse steps run the Patch Scheduler's trained path (`coarse_tokens` /
    `coarse_output`) through the host's blocks with the block LoRA."""

    part, order, trains_alone = "coarse", 30, True
    refusal = "Trainer: coarse patches are trained on their own (parts 'coarse' alone); train width and TD-LoRA in another run."
    file_suffix, spec_fields = ".patch_embedding.safetensors", ("coarse_schedule", "coarse_init", "rank")

    @classmethod
    def check(cls, spec: "StudentSpec") -> None:
        schedule_factor(spec.coarse_schedule)

    def __init__(self, context: "StudentContext") -> None:
        super().__init__()
        adapter, spec = context.adapter, context.spec
        grid = adapter.coarse_grid()
        if grid is None or not grid.trained_embedding:
            raise UnsupportedModelError(f"Trainer: {adapter.display_name} models take no trained coarse-patch embedding.")
        object.__setattr__(self, "adapter", adapter)
        object.__setattr__(self, "diffusion_model", context.diffusion_model)
        self.grid, self.schedule_text, self.init = grid, spec.coarse_schedule, spec.coarse_init
        self.schedule, factor = schedule_factor(spec.coarse_schedule)
        self.embedding = CoarseParts(grid, context.diffusion_model, factor, spec.coarse_init)
        self.bank = LowRankBank(adapter, context.diffusion_model, spec.rank, context.generator)
        self._ratios: dict[tuple, float] = {}  # call shapes -> FLOPs ratio of a coarse call

    @property
    def factor(self) -> int:
        return self.embedding.factor

    def forward_call(self, student: "DynamicStudent", call: "StudentCall") -> tuple[torch.Tensor, torch.Tensor]:
        """A coarse call as the Patch Scheduler's trained path runs it; the native-resolution velocity and the (B,)
        FLOPs ratio of the call."""
        grid, factor, latent = self.grid, self.factor, self.adapter.latent_argument
        x = call.arguments[latent]
        layers = self.embedding.layers(x)
        t = grid.flow_time(call.arguments)
        tokens, placeholder = coarse_tokens(grid, x, layers, factor, t)
        arguments = {**call.arguments, latent: placeholder, **grid.with_flow_time(call.arguments, coarse_time(t, factor)[1])}
        call.layout = self.adapter.call_layout(arguments)
        call.scratch["coarse"] = {"count": tokens.shape[1]}
        student.run_model(call, arguments, lambda options: grid.coarse_options(
            options, factor, post_input=lambda embedded: grid.replace_image_tokens(embedded, tokens)))
        capture = call.scratch.pop("coarse")
        out = coarse_output(grid, self.diffusion_model, capture["hidden"], capture["conditioning"], layers, x, factor, t)
        return out, torch.tensor(self.call_ratio_of(student, call.arguments, x)).expand(x.shape[0])

    def linears(self, block: BlockRef) -> tuple[str, ...]:
        return self.bank.linears(block)

    def adapt_linear(self, call: "StudentCall", position: int, block: BlockRef, name: str, layer: torch.nn.Module,
                     pieces: LinearPieces) -> None:
        self.bank.add_bypass(block, name, pieces, None)

    def after_block(self, call: "StudentCall", position: int, block: BlockRef, args: dict, out: dict) -> None:
        capture = call.scratch.get("coarse")
        if capture is not None and block == self.grid.last_block:  # what the trained de-embedding reads
            capture["hidden"] = self.grid.image_hidden(block, out, call.layout, capture["count"])
            capture["conditioning"] = self.grid.final_conditioning(args)

    def extra_flops(self, block: BlockRef, work: Any) -> float:
        return self.bank.extra_flops(block, work)

    def call_ratio_of(self, student: "DynamicStudent", arguments: dict[str, Any], x: torch.Tensor) -> float:
        """FLOPs of one coarse call per sample (blocks on the coarse grid with the block LoRA, the trained
        layers) over the native call's; the shapes decide it, so it is computed once per shape of the call."""
        key = tuple((name, tuple(value.shape[1:])) for name, value in arguments.items() if isinstance(value, torch.Tensor))
        found = self._ratios.get(key)
        if found is None:
            placeholder = coarse_placeholder(self.grid, x[:1], self.factor)
            coarse = self.adapter.call_layout({**arguments, self.adapter.latent_argument: placeholder})
            with torch.no_grad():
                blocks = student.plain_ratio(coarse) * student.full_flops(coarse)
                layers = coarse_layer_flops(self.grid, x[:1], self.embedding.layers(), self.factor)
            found = self._ratios[key] = (blocks + layers) / student.full_flops(self.adapter.call_layout(arguments))
        return found

    def run_ratio(self, student: "DynamicStudent", bank: "Trajectories", *, grad: bool = False, **ignored: Any) -> Any:
        """The schedule fixes which steps run coarse: a constant, coarse steps at the coarse call's ratio."""
        rows = bank.fixed(1)
        steps = len(bank.timesteps)
        coarse = len(coarse_step_indices(self.schedule, steps))
        call = self.call_ratio_of(student, student.arguments(rows), student.latent(rows))
        ratio = (coarse * call + (steps - coarse)) / max(steps, 1)
        return torch.tensor(ratio) if grad else ratio

    def changed_timesteps(self, bank: "Trajectories") -> list[float]:
        return [bank.timesteps[s] for s in coarse_step_indices(self.schedule, len(bank.timesteps))]

    def training_rows(self, bank: "Trajectories") -> "Trajectories":
        """The bank's rows at the schedule's coarse steps (the only calls the coarse parts change)."""
        timesteps = self.changed_timesteps(bank)
        if not timesteps:
            raise ValueError(f"Trainer: the coarse schedule '{self.schedule_text}' runs no step of the "
                             f"{len(bank.timesteps)}-step teacher runs coarse.")
        return bank.restricted(timesteps)

    def metadata(self) -> dict[str, str]:
        return {"coarse_schedule": self.schedule_text, "coarse_init": self.init}

    def block_lora(self) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """The coarse calls' block LoRA as the patch embedding file holds it: block label -> linear -> (down, up)."""
        blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        pairs = self.bank.pairs()
        for key, (block, name) in self.bank.paths.items():
            blocks.setdefault(block.label, {})[name] = pairs[key.replace("/", ".")]
        return blocks

    def save(self, student: "DynamicStudent", path: Any, metadata: dict[str, str]) -> None:
        with torch.no_grad():
            layers = self.embedding.layers()
        save_patch_embedding_file(path, self.grid.file_fields(), {self.factor: layers}, {self.factor: self.block_lora()},
                                  metadata=metadata)


__all__ = ["CoarsePart", "CoarseParts", "INITIALISATIONS", "coarse_step_indices", "schedule_factor"]
