"""The teacher's trajectories: recorded full-compute model calls (inputs and outputs) to distil from.

A host integration records every diffusion-model call of ordinary sampling runs of the frozen model
(the model's own sampler and schedule, the user's conditionings) and adds them here; the trainer then
samples rows (one sample of one call: the call's tensor arguments by the host's parameter names, its
sigma, the teacher's output) from them. Rows of different shapes (latent sizes, text lengths) are kept
in separate groups, since one training batch must stack. Which argument is the latent and which the
timestep is the adapter's knowledge (`latent_argument`, `timestep_argument`), passed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

# Row entries of the trainer's own, beside the model-call arguments: the per-sample sigma and the teacher's output.
TRAINER_KEYS = ("sigmas", "target")
# Noise seed of the first teacher run (then +1 per run; rollouts of on-policy round k add k strides): away from the
# seeds people and the benchmark sample with (0, 1, ...), so that what a run is judged on is noise it never saw.
TEACHER_FIRST_SEED = 1000
ROLLOUT_SEED_STRIDE = 1000


def teacher_seeds(runs: int, first: int = TEACHER_FIRST_SEED) -> list[int]:
    """Noise seeds of the teacher's sampling runs per conditioning: `first`, `first` + 1, ..."""
    return list(range(first, first + runs))


def rollout_seeds(seeds: list[int] | tuple[int, ...], round_index: int) -> list[int]:
    """Noise seeds of on-policy round `round_index`'s rollouts (from 0): the teacher's, moved by a stride per round."""
    return [seed + ROLLOUT_SEED_STRIDE * (round_index + 1) for seed in seeds]


def step_index(timestep: float, timesteps: list[float]) -> int | None:
    """The position of `timestep` among a schedule's `timesteps` (the same float up to rounding), or None."""
    return next((i for i, known in enumerate(timesteps) if abs(timestep - known) < 1e-7), None)


def detached(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) CPU copy, usable by autograd later: ComfyUI runs nodes under
    torch.inference_mode(), whose tensors autograd refuses to save."""
    with torch.inference_mode(False):
        return tensor.detach().to("cpu").clone()


@dataclass
class Trajectories:
    """Recorded rows, grouped by shape; `timesteps` are the distinct steps of the sampling schedule."""

    latent_argument: str
    timestep_argument: str
    groups: dict[tuple, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    timesteps: list[float] = field(default_factory=list)
    # Distinct values of the conditioning arguments recorded so far, by (name, shape, dtype, sum): every call
    # of a prompt carries its own copy of the same text embedding, 4 of FLUX's 5 MB per row at 1024 px.
    _distinct: dict[tuple, list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def add_call(self, arguments: Mapping[str, torch.Tensor], sigmas: torch.Tensor, output: torch.Tensor) -> None:
        """One model call of the teacher: its tensor arguments (batched, by parameter name), per-sample
        sigmas and output."""
        reserved = [k for k in TRAINER_KEYS if k in arguments]
        if reserved:
            raise ValueError(f"the model call has arguments named {', '.join(reserved)}, which the trainer's rows use")
        batch = arguments[self.latent_argument].shape[0]
        if output.shape[0] != batch:
            raise ValueError(f"the model output has batch {output.shape[0]}, its input {batch}")
        row_tensors = {**arguments, "sigmas": sigmas.reshape(-1).float(), "target": output}
        key = tuple(sorted((k, tuple(v.shape[1:]), str(v.dtype)) for k, v in row_tensors.items()))
        group = self.groups.setdefault(key, {k: [] for k in row_tensors})
        per_call = {self.latent_argument, self.timestep_argument, *TRAINER_KEYS}
        for name, tensor in row_tensors.items():
            tensor = tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor
            rows = detached(tensor).unbind(0)
            group[name].extend(rows if name in per_call else (self._shared(name, row) for row in rows))
        for t in arguments[self.timestep_argument].reshape(-1).tolist():
            if step_index(t, self.timesteps) is None:
                self.timesteps.append(float(t))

    def _shared(self, name: str, row: torch.Tensor) -> torch.Tensor:
        """`row`, or the equal tensor recorded before under `name` (a new value is stored compactly, not as a
        view that keeps its whole batch alive)."""
        key = (name, tuple(row.shape), row.dtype, float(row.double().sum()) if row.is_floating_point() else int(row.sum()))
        known = self._distinct.setdefault(key, [])
        found = next((tensor for tensor in known if torch.equal(tensor, row)), None)
        if found is None:
            found = row.clone()
            known.append(found)
        return found

    @property
    def rows(self) -> int:
        return sum(len(group["target"]) for group in self.groups.values())

    @property
    def dtype(self) -> torch.dtype:
        """The latent's dtype (that of the largest group)."""
        if not self.groups:
            return torch.float32
        return self._largest()[self.latent_argument][0].dtype

    def _largest(self) -> dict[str, list[torch.Tensor]]:
        return self.groups[max(self.groups, key=lambda k: len(self.groups[k]["target"]))]

    def _rows(self, key: tuple, index: list[int], device: torch.device | str) -> dict[str, torch.Tensor]:
        """Rows `index` of one group, stacked. Only those rows: a stacked copy of whole groups, kept for fast
        indexing, held a second copy of the bank (and a third of the coarse rows, a fourth of the previous
        round's while a round ran): 13 GB after four on-policy rounds on the reference model."""
        return {k: torch.stack([tensors[i] for i in index]).to(device) for k, tensors in self.groups[key].items()}

    def sample(self, size: int, generator: torch.Generator, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`size` random rows of one group (a group chosen in proportion to its rows)."""
        if not self.groups:
            raise ValueError("no teacher trajectories were recorded")
        keys = list(self.groups)
        counts = torch.tensor([len(self.groups[k]["target"]) for k in keys], dtype=torch.float64)
        key = keys[int(torch.multinomial(counts, 1, generator=generator))] if len(keys) > 1 else keys[0]
        index = torch.randint(len(self.groups[key]["target"]), (size,), generator=generator)
        return self._rows(key, index.tolist(), device)

    def fixed(self, size: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`size` rows spread evenly over the largest group (the same rows every time), for evaluation."""
        key = max(self.groups, key=lambda k: len(self.groups[k]["target"]))
        count = len(self.groups[key]["target"])
        index = torch.linspace(0, count - 1, min(size, count)).round().long()
        return self._rows(key, index.tolist(), device)

    def restricted(self, timesteps: list[float]) -> "Trajectories":
        """The rows recorded at the given timesteps only (the schedule's `timesteps` kept whole)."""
        groups = {}
        for key, group in self.groups.items():
            index = [i for i, t in enumerate(group[self.timestep_argument])
                     if step_index(float(t.reshape(-1)[0]), timesteps) is not None]
            if index:
                groups[key] = {name: [tensors[i] for i in index] for name, tensors in group.items()}
        return Trajectories(self.latent_argument, self.timestep_argument, groups, list(self.timesteps))

    def extended(self, other: "Trajectories") -> "Trajectories":
        """These rows and `other`'s (the same schedule), e.g. the teacher's runs and the student's rollouts."""
        groups = {key: {name: list(tensors) for name, tensors in group.items()} for key, group in self.groups.items()}
        for key, group in other.groups.items():
            mine = groups.setdefault(key, {name: [] for name in group})
            for name, tensors in group.items():
                mine[name].extend(tensors)
        return Trajectories(self.latent_argument, self.timestep_argument, groups, list(self.timesteps))

    def step_sigmas(self) -> list[float]:
        """The sigma of every step of the schedule (`timesteps`' order), read from the recorded rows."""
        found: dict[int, float] = {}
        for group in self.groups.values():
            for t, sigma in zip(group[self.timestep_argument], group["sigmas"]):
                value = float(t.reshape(-1)[0])
                step = step_index(value, self.timesteps)
                if step is not None:
                    found.setdefault(step, float(sigma))
            if len(found) == len(self.timesteps):
                break
        return [found[i] for i in range(len(self.timesteps)) if i in found]

    def save(self, path: str) -> None:
        torch.save({"groups": self.groups, "timesteps": self.timesteps, "latent_argument": self.latent_argument,
                    "timestep_argument": self.timestep_argument}, path)

    @classmethod
    def load(cls, path: str) -> "Trajectories":
        state = torch.load(path, weights_only=True)
        return cls(state["latent_argument"], state["timestep_argument"], state["groups"], state["timesteps"])
