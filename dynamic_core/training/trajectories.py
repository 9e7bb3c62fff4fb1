"""The teacher's trajectories: recorded full-compute model calls (inputs and outputs) to distil from.

A host integration records every diffusion-model call of ordinary sampling runs of the frozen model
(the model's own sampler and schedule, the user's conditionings) and adds them here; the trainer then
samples rows (one sample of one call: x_i, its timestep / sigma, its conditioning, the teacher's
output) from them. Rows of different shapes (latent sizes, text lengths) are kept in separate
groups, since one training batch must stack.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# the model-call arguments a row keeps, besides the teacher's output ("target") and "sigmas"
INPUTS = ("x", "timestep", "context", "y", "guidance")


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) CPU copy, usable by autograd later: ComfyUI runs nodes under
    torch.inference_mode(), whose tensors autograd refuses to save."""
    with torch.inference_mode(False):
        return tensor.detach().to("cpu").clone()


@dataclass
class Trajectories:
    """Recorded rows, grouped by shape; `timesteps` are the distinct steps of the sampling schedule."""

    groups: dict[tuple, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    _stacked: dict[tuple, dict[str, torch.Tensor]] = field(default_factory=dict)

    def add_call(self, arguments: Mapping[str, torch.Tensor | None], sigmas: torch.Tensor, output: torch.Tensor) -> None:
        """One model call of the teacher: its arguments (batched), per-sample sigmas and output."""
        x = arguments["x"]
        batch = x.shape[0]
        if output.shape[0] != batch:
            raise ValueError(f"the model output has batch {output.shape[0]}, its input {batch}")
        row_tensors = {k: arguments.get(k) for k in INPUTS}
        row_tensors["sigmas"] = sigmas.reshape(-1).float()
        row_tensors["target"] = output
        key = tuple((k, tuple(v.shape[1:])) for k, v in row_tensors.items() if v is not None)
        group = self.groups.setdefault(key, {k: [] for k, v in row_tensors.items() if v is not None})
        for name, tensor in row_tensors.items():
            if tensor is None:
                continue
            tensor = tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor
            group[name].extend(detached(tensor).unbind(0))
        self._stacked.pop(key, None)
        for t in arguments["timestep"].reshape(-1).tolist():
            if not any(abs(t - known) < 1e-7 for known in self.timesteps):
                self.timesteps.append(float(t))

    @property
    def rows(self) -> int:
        return sum(len(group["x"]) for group in self.groups.values())

    def _stack(self, key: tuple) -> dict[str, torch.Tensor]:
        found = self._stacked.get(key)
        if found is None:
            found = self._stacked[key] = {k: torch.stack(v) for k, v in self.groups[key].items()}
        return found

    def sample(self, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`size` random rows of one group (a group chosen in proportion to its rows)."""
        if not self.groups:
            raise ValueError("no teacher trajectories were recorded")
        keys = list(self.groups)
        counts = torch.tensor([len(self.groups[k]["x"]) for k in keys], dtype=torch.float64)
        key = keys[int(torch.multinomial(counts, 1, generator=generator))] if len(keys) > 1 else keys[0]
        stacked = self._stack(key)
        index = torch.randint(len(stacked["x"]), (size,), generator=generator)
        return {k: v[index].to(device) for k, v in stacked.items()}

    def fixed(self, size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`size` rows spread evenly over the largest group (the same rows every time), for evaluation."""
        key = max(self.groups, key=lambda k: len(self.groups[k]["x"]))
        stacked = self._stack(key)
        count = len(stacked["x"])
        index = torch.linspace(0, count - 1, min(size, count)).round().long()
        return {k: v[index].to(device) for k, v in stacked.items()}

    def save(self, path: str) -> None:
        torch.save({"groups": self.groups, "timesteps": self.timesteps}, path)

    @classmethod
    def load(cls, path: str) -> "Trajectories":
        state = torch.load(path, weights_only=True)
        return cls(state["groups"], state["timesteps"])
