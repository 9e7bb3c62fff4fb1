"""Trainable low-rank bypasses on every block linear (TD-LoRA's experts, the coarse calls' block LoRA)."""
from __future__ import annotations

import math

import torch

from ..core.method import LinearPieces
from ..families import BlockRef, ModelAdapter, block_linear_index


class LowRankBank(torch.nn.Module):
    """`columns` low-rank columns on each of the model's block linears: A random, B zero, so the bypass starts at
    exactly zero (the student starts as the teacher). Keys are the linears' module paths with '/' for '.'."""

    def __init__(self, adapter: ModelAdapter, diffusion_model: torch.nn.Module, columns: int, generator: torch.Generator):
        super().__init__()
        self.adapter = adapter
        self.paths: dict[str, tuple[BlockRef, str]] = {}
        self.down = torch.nn.ParameterDict()
        self.up = torch.nn.ParameterDict()
        for path, (block, name, layer) in block_linear_index(adapter, diffusion_model).items():
            out_features, in_features = layer.weight.shape
            key = path.replace(".", "/")
            self.paths[key] = (block, name)
            self.down[key] = torch.nn.Parameter(torch.randn(columns, in_features, generator=generator) / math.sqrt(in_features))
            self.up[key] = torch.nn.Parameter(torch.zeros(out_features, columns))
        self.columns = columns
        self.by_block: dict[BlockRef, dict[str, str]] = {}
        for key, (block, name) in self.paths.items():
            self.by_block.setdefault(block, {})[name] = key

    def linears(self, block: BlockRef) -> tuple[str, ...]:
        return tuple(self.by_block.get(block, ()))

    def add_bypass(self, block: BlockRef, name: str, pieces: LinearPieces, columns: torch.Tensor | None) -> None:
        key = self.by_block.get(block, {}).get(name)
        if key is not None:
            pieces.bypasses.append(((self.down[key], self.up[key]), columns))

    def extra_flops(self, block: BlockRef, work: object) -> float:
        """The bypasses' FLOPs in a block call of `work` (their in/out sizes shrink with the width, as the sliced
        bypass does)."""
        layers = self.by_block.get(block)
        if not layers:
            return 0.0
        sizes = self.adapter.linear_sizes(block, work)
        return sum(2.0 * sizes[name][0] * self.columns * (sizes[name][1] + sizes[name][2]) for name in layers)

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each linear's (down, up) as float32 CPU copies, by module path."""
        return {key.replace("/", "."): (self.down[key].detach().float().cpu(), self.up[key].detach().float().cpu())
                for key in self.paths}


__all__ = ["LowRankBank"]
