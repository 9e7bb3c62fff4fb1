"""TD-LoRA (DyDiT++): timestep-gated mixtures of low-rank experts, applied as an in-place bypass.

The reasoning and the equations: docs/methods/td_lora.md.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from ...families import BlockInternals, BlockRef
from ...core.flops import FlopBreakdown
from ...core.method import DynamicMethod, register
from ...core.low_rank import GatedBypass, SummedExtra, expert_columns
from .experts import GateNetwork, LowRankLayer
from .settings import TDLoRASettings


if TYPE_CHECKING:
    from ...core.executor import CallState, ModelCall, RunContext


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

