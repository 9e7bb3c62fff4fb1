"""Width router files: per block, linear maps of the model's own timestep embedding to head and
MLP-group logits (DyDiT's timestep-wise width router), as safetensors. See the README section
"Width router file format"; the header names the model with `ModelInfo.header`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ...families import BlockRef, ModelAdapter, ModelInfo
from ...core.files import read_safetensors
from ...core.flops import linear_flops

ROUTER_FORMAT = "dynamic_dit.width_router"
ROUTER_VERSION = 1
ROUTER_FEATURES = "time_in"  # the model's own timestep embedding, time_in(sinusoidal(t, 256))


@dataclass(frozen=True)
class RouterHeader:
    """What a width router file was made for; stored as safetensors header metadata (all strings)."""

    architecture: str  # adapter family, e.g. "flux"
    hidden_size: int
    num_heads: int
    mlp_hidden: int
    mlp_groups: int
    depths: tuple[tuple[str, int], ...]  # (block kind, count) by kind, e.g. (("double", 19), ("single", 38))
    features: str = ROUTER_FEATURES
    version: int = ROUTER_VERSION

    @classmethod
    def for_adapter(cls, adapter: ModelAdapter, mlp_groups: int | None = None) -> "RouterHeader":
        info = adapter.model_info()
        return cls(
            architecture=info.family,
            hidden_size=info.hidden_size,
            num_heads=info.num_heads,
            mlp_hidden=info.mlp_hidden,
            mlp_groups=mlp_groups or info.num_heads,
            depths=tuple(sorted(info.depths)),
        )

    @property
    def feature_dim(self) -> int:
        return self.hidden_size  # time_in maps to the hidden size

    def block_labels(self) -> list[str]:
        return [BlockRef(kind, i).label for kind, count in self.depths for i in range(count)]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for label in self.block_labels():
            for part, units in (("heads", self.num_heads), ("mlp", self.mlp_groups)):
                shapes[f"{label}.{part}.weight"] = (units, self.feature_dim)
                shapes[f"{label}.{part}.bias"] = (units,)
        return shapes

    def model_info(self) -> ModelInfo:
        return ModelInfo(self.architecture, self.architecture, self.hidden_size, self.num_heads, self.mlp_hidden, self.depths)

    def metadata(self) -> dict[str, str]:
        return {
            "format": ROUTER_FORMAT,
            "version": str(self.version),
            **self.model_info().header("mlp_hidden"),
            "mlp_groups": str(self.mlp_groups),
            "features": self.features,
        }

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], name: str) -> "RouterHeader":
        found = metadata.get("format")
        if found != ROUTER_FORMAT:
            what = f"its metadata 'format' is '{found}'" if found else "it has no 'format' metadata"
            raise ValueError(f"'{name}' is not a Dynamic DiT width router: {what}, expected '{ROUTER_FORMAT}'.")

        def integer(key: str) -> int:
            value = metadata.get(key)
            if value is None:
                raise ValueError(f"Width router '{name}': metadata '{key}' is missing.")
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"Width router '{name}': metadata '{key}' must be an integer, found '{value}'.") from None
            if number < 1 and not key.startswith("depth_"):
                raise ValueError(f"Width router '{name}': metadata '{key}' must be positive, found {number}.")
            return number

        version = integer("version")
        if version != ROUTER_VERSION:
            raise ValueError(
                f"Width router '{name}' has format version {version}; this pack reads version {ROUTER_VERSION}. "
                + ("Update the Dynamic DiT nodes." if version > ROUTER_VERSION else "Export the router again.")
            )
        features = metadata.get("features")
        if features != ROUTER_FEATURES:
            raise ValueError(f"Width router '{name}': features '{features}' are not supported (expected '{ROUTER_FEATURES}').")
        depths = tuple(sorted((key[len("depth_"):], integer(key)) for key in metadata if key.startswith("depth_")))
        if not depths or sum(count for _, count in depths) == 0:
            raise ValueError(f"Width router '{name}': no 'depth_<block kind>' metadata, so it routes no blocks.")
        header = cls(
            architecture=metadata.get("architecture", ""),
            hidden_size=integer("hidden_size"),
            num_heads=integer("num_heads"),
            mlp_hidden=integer("mlp_hidden"),
            mlp_groups=integer("mlp_groups"),
            depths=depths,
            features=features,
            version=version,
        )
        if header.mlp_hidden % header.mlp_groups:
            raise ValueError(
                f"Width router '{name}': {header.mlp_groups} MLP groups do not divide the {header.mlp_hidden} MLP hidden units."
            )
        return header

    def describe(self) -> str:
        blocks = " + ".join(f"{count} {kind}" for kind, count in self.depths)
        return (
            f"{self.architecture or 'unknown architecture'} with hidden size {self.hidden_size}, {self.num_heads} heads, "
            f"{self.mlp_hidden} MLP units, {blocks} blocks"
        )


class WidthRouter:
    """Per block, linear maps of the timestep features to head and MLP-group logits (keep where > 0).

    Tensors are validated (keys, shapes, dtypes, finite values) and kept stacked in float32 on the
    CPU; they are shared, never copied, by every clone of a patched model.
    """

    def __init__(self, header: RouterHeader, tensors: Mapping[str, torch.Tensor], name: str = "router"):
        self.header, self.name = header, name
        expected = header.expected_shapes()
        missing = [key for key in expected if key not in tensors]
        unexpected = sorted(key for key in tensors if key not in expected)
        if missing:
            raise ValueError(
                f"Width router '{name}': {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}; "
                f"a router for {header.describe()} has {len(expected)} tensors named '<block>.heads|mlp.weight|bias'."
            )
        if unexpected:
            raise ValueError(f"Width router '{name}': unexpected tensor(s) {', '.join(unexpected[:3])} for {header.describe()}.")
        for key, shape in expected.items():
            tensor = tensors[key]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"Width router '{name}': '{key}' has shape {tuple(tensor.shape)}, expected {shape}.")
            if not tensor.is_floating_point():
                raise ValueError(f"Width router '{name}': '{key}' has dtype {tensor.dtype}, expected a floating-point dtype.")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"Width router '{name}': '{key}' contains NaN or infinite values.")
        self.labels = header.block_labels()

        def stacked(part: str, kind: str) -> torch.Tensor:
            return torch.stack([tensors[f"{label}.{part}.{kind}"].detach().float().cpu() for label in self.labels])

        self.head_weight, self.head_bias = stacked("heads", "weight"), stacked("heads", "bias")
        self.group_weight, self.group_bias = stacked("mlp", "weight"), stacked("mlp", "bias")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for row, label in enumerate(self.labels):
            out[f"{label}.heads.weight"], out[f"{label}.heads.bias"] = self.head_weight[row], self.head_bias[row]
            out[f"{label}.mlp.weight"], out[f"{label}.mlp.bias"] = self.group_weight[row], self.group_bias[row]
        return {k: v.contiguous() for k, v in out.items()}

    def check(self, adapter: ModelAdapter) -> None:
        """Raise ValueError unless this router was made for the adapter's model."""
        mine = self.header
        model = RouterHeader.for_adapter(adapter, mine.mlp_groups)
        if (mine.architecture, mine.hidden_size, mine.num_heads, mine.mlp_hidden, dict(mine.depths)) != (
            model.architecture, model.hidden_size, model.num_heads, model.mlp_hidden, dict(model.depths)
        ):
            raise ValueError(
                f"Width router '{self.name}' was made for {mine.describe()}; this model is {model.describe()}. "
                "Use a router trained for this model."
            )

    @property
    def flops(self) -> float:
        """FLOPs of evaluating every block's router once."""
        rows = self.head_weight.shape[0] * (self.head_weight.shape[1] + self.group_weight.shape[1])
        return linear_flops(1, self.header.feature_dim, rows)


def save_width_router(path: str | Path, router: WidthRouter) -> None:
    from ...core.files import save_safetensors

    save_safetensors(router.tensors(), path, router.header.metadata())


def load_width_router(path: str | Path, name: str | None = None) -> WidthRouter:
    """Read and validate a width router file; every problem raises ValueError naming it."""
    name = name or Path(path).name
    tensors, metadata = read_safetensors(path, f"Width router '{name}'", part=ROUTER_FORMAT)
    return WidthRouter(RouterHeader.from_metadata(metadata, name), tensors, name)


__all__ = ["ROUTER_FEATURES", "ROUTER_FORMAT", "ROUTER_VERSION", "RouterHeader", "WidthRouter", "load_width_router", "save_width_router"]
