"""TD-LoRA as the trainer learns it: K low-rank experts on every block linear, mixed by a gate over sigma (the
TD-LoRA file's parametrisation), the compensation that makes a reduced model match the full one."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ...core.method import LinearPieces, TrainablePart, register_part
from ...families import BlockRef
from ...training.low_rank import LowRankBank
from .experts import GateWeights, sinusoidal_embedding
from .file import ExpertLayer, save_td_lora_file

if TYPE_CHECKING:
    from ...training.student import DynamicStudent, StudentCall, StudentContext, StudentSpec


@register_part
class TDLoRAPart(TrainablePart):
    part, order = "td_lora", 20
    file_suffix, spec_fields = ".td_lora.safetensors", ("experts", "rank", "gate_hidden", "gate_embed")

    @classmethod
    def check(cls, spec: "StudentSpec") -> None:
        if spec.experts < 1 or spec.rank < 1:
            raise ValueError(f"Trainer: TD-LoRA needs experts >= 1 and rank >= 1, got K={spec.experts}, r={spec.rank}.")

    def __init__(self, context: "StudentContext") -> None:
        super().__init__()
        spec, generator = context.spec, context.generator
        object.__setattr__(self, "adapter", context.adapter)
        self.experts, self.rank, self.gate_embed = spec.experts, spec.rank, spec.gate_embed
        self.time_scale = context.adapter.model_info().timestep_scale  # the gate embeds sigma as the file will
        self.bank = LowRankBank(context.adapter, context.diffusion_model, spec.experts * spec.rank, generator)
        if spec.experts > 1:
            self.gate = torch.nn.Sequential(
                torch.nn.Linear(spec.gate_embed, spec.gate_hidden), torch.nn.SiLU(), torch.nn.Linear(spec.gate_hidden, spec.experts)
            )
            with torch.no_grad():  # uniform gates at the start; the first layer seeded like everything else
                self.gate[0].weight.copy_(torch.randn(spec.gate_hidden, spec.gate_embed, generator=generator) / math.sqrt(spec.gate_embed))
                self.gate[0].bias.zero_()
                self.gate[2].weight.zero_()
                self.gate[2].bias.zero_()

    def columns(self, sigmas: torch.Tensor) -> torch.Tensor | None:
        """(B, K*r) expert gates spread over their rank columns (None for K = 1: the gate is 1)."""
        if self.experts == 1:
            return None
        embedding = sinusoidal_embedding(sigmas.float(), self.gate_embed, self.time_scale)
        gates = torch.softmax(self.gate(embedding), dim=-1)
        return gates.repeat_interleave(self.rank, dim=1)

    def prepare(self, call: "StudentCall") -> None:
        call.decisions["columns"] = self.columns(call.sigmas)

    def linears(self, block: BlockRef) -> tuple[str, ...]:
        return self.bank.linears(block)

    def adapt_linear(self, call: "StudentCall", position: int, block: BlockRef, name: str, layer: torch.nn.Module,
                     pieces: LinearPieces) -> None:
        self.bank.add_bypass(block, name, pieces, call.decisions.get("columns"))

    def extra_flops(self, block: BlockRef, work: Any) -> float:
        return self.bank.extra_flops(block, work)

    def layers(self) -> tuple[dict[str, ExpertLayer], GateWeights | None]:
        """The experts as the file holds them (stacked expert-major along the rank axis: rows k*r..(k+1)*r of
        down, columns of up) and the gate."""
        k, r = self.experts, self.rank
        layers = {path: ExpertLayer(down.reshape(k, r, -1).contiguous(), up.reshape(up.shape[0], k, r).permute(1, 0, 2).contiguous(), float(r))
                  for path, (down, up) in self.bank.pairs().items()}
        gate = None
        if k > 1:
            g = self.gate
            gate = GateWeights(*(t.detach().float().cpu().contiguous() for t in (g[0].weight, g[0].bias, g[2].weight, g[2].bias)))
        return layers, gate

    def save(self, student: "DynamicStudent", path: Any, metadata: dict[str, str]) -> None:
        layers, gate = self.layers()
        save_td_lora_file(path, layers, self.adapter.model_info().header(), gate, metadata=metadata)


__all__ = ["TDLoRAPart"]
