"""Token-router files: trained per-block token routers and learned keep ratios, as safetensors.

The reasoning and the equations: docs/methods/token_router.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

import torch
import torch.nn.functional as F

from ...core.files import header_problem, read_safetensors

if TYPE_CHECKING:
    from ...families import ModelAdapter

FORMAT = "dynamic_dit.token_router"
VERSION = "1"
ROUTER_KINDS = ("dydit", "diffcr", "none")
_PARAMS = {
    "dydit": ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"),
    "diffcr": ("weight", "bias"),
    "none": (),
}


def model_description(adapter: "ModelAdapter") -> dict[str, str]:
    """The metadata a router file records about the model it was made for."""
    return adapter.model_info().header()


@dataclass(frozen=True, eq=False)
class RouterFile:
    """A validated router file. `routers`: block label -> parameter name -> float32 tensor."""

    name: str
    router: str  # "dydit", "diffcr" or "none"
    model: Mapping[str, str]  # architecture, hidden_size, num_heads, depth_<kind> as in the metadata
    routers: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    ratios: torch.Tensor | None = None  # (regions, blocks)
    ratio_bounds: torch.Tensor | None = None  # (regions + 1,)

    def check_model(self, adapter: "ModelAdapter") -> None:
        """Raise ValueError unless this file was made for the adapter's model."""
        expected = model_description(adapter)
        for key, value in expected.items():
            found = self.model.get(key)
            if found != value:
                raise ValueError(
                    f"Router file '{self.name}' was made for another model: {key} is {found} in the file, "
                    f"{value} in this model ({adapter.display_name}). Use a router file trained for this model."
                )
        extra = sorted(set(self.model) - set(expected))
        if extra:
            raise ValueError(f"Router file '{self.name}' describes block kinds this model does not have: {', '.join(extra)}.")
        labels = [block.label for block in adapter.blocks]
        if self.ratios is not None and self.ratios.shape[1] != len(labels):
            raise ValueError(
                f"Router file '{self.name}': 'ratios' has {self.ratios.shape[1]} block columns, this model has {len(labels)} blocks."
            )

    def region_ratios(self, percent: float) -> torch.Tensor | None:
        """The learned keep ratio of every block at sigma percent `percent`, or None without ratios."""
        if self.ratios is None or self.ratio_bounds is None:
            return None
        return self.ratios[region_of(self.ratio_bounds, percent)]

    def describe(self) -> str:
        parts = [f"{self.router} routers for {len(self.routers)} blocks" if self.routers else "no routers"]
        if self.ratios is not None:
            parts.append(f"ratios in {self.ratios.shape[0]} regions")
        return f"{self.name} ({', '.join(parts)})"


def region_of(bounds: torch.Tensor, percent: float) -> int:
    """The region of sigma percent `percent` among region edges `bounds` (regions + 1,), from 0 to 1
    (an edge belongs to the region above it; the Token Router and the trainer both use this rule)."""
    return int(torch.searchsorted(bounds[1:-1], torch.tensor(float(percent)), right=True))


def save_router_file(
    path: str | os.PathLike,
    adapter_or_model: "ModelAdapter | Mapping[str, str]",
    router: str,
    routers: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ratios: torch.Tensor | None = None,
    ratio_bounds: torch.Tensor | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a router file (for tests and trainers). `adapter_or_model` gives the model metadata;
    `metadata` adds entries (a trainer's: base-weight fingerprint, command, ...)."""
    from ...core.files import save_safetensors

    model = adapter_or_model if isinstance(adapter_or_model, Mapping) else model_description(adapter_or_model)
    tensors = {
        f"routers.{label}.{name}": tensor.detach().to("cpu", torch.float32).contiguous()
        for label, params in (routers or {}).items()
        for name, tensor in params.items()
    }
    if ratios is not None:
        tensors["ratios"] = ratios.detach().to("cpu", torch.float32).contiguous()
        bounds = ratio_bounds if ratio_bounds is not None else torch.linspace(0, 1, ratios.shape[0] + 1)
        tensors["ratio_bounds"] = bounds.detach().to("cpu", torch.float32).contiguous()
    header = {**(metadata or {}), "format": FORMAT, "version": VERSION, "router": router, **{k: str(v) for k, v in model.items()}}
    save_safetensors(tensors, path, header)


def load_router_file(path: str | os.PathLike, name: str | None = None) -> RouterFile:
    """Read and validate a router file; any problem raises ValueError naming the key and what was expected."""
    name = name or os.path.basename(os.fspath(path))
    tensors, metadata = read_safetensors(path, f"Router file '{name}'", part=FORMAT)
    return _validate(name, metadata, tensors)


def _validate(name: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> RouterFile:
    def fail(message: str) -> ValueError:
        return ValueError(f"Router file '{name}': {message}")

    problem = header_problem(metadata, FORMAT, VERSION, "token-router")
    if problem is not None:
        raise fail(problem)
    router = metadata.get("router")
    if router not in ROUTER_KINDS:
        raise fail(f"metadata 'router' is {router!r}, expected one of {', '.join(ROUTER_KINDS)}.")
    model = {k: v for k, v in metadata.items() if k in ("architecture", "hidden_size", "num_heads") or k.startswith("depth_")}
    for key in ("architecture", "hidden_size", "num_heads"):
        if key not in model:
            raise fail(f"metadata has no '{key}'.")
    try:
        hidden = int(model["hidden_size"])
        depths = {k[len("depth_"):]: int(v) for k, v in model.items() if k.startswith("depth_")}
    except ValueError:
        raise fail("metadata 'hidden_size' and 'depth_*' must be integers.") from None
    if not depths:
        raise fail("metadata has no 'depth_<kind>' entries (e.g. depth_double, depth_single).")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise fail(f"tensor '{key}' has dtype {tensor.dtype}, expected a floating-point dtype.")
        if not torch.isfinite(tensor).all():
            raise fail(f"tensor '{key}' contains NaN or infinite values.")

    routers = _routers(tensors, router, depths, hidden, fail)
    ratios, bounds = _ratios(tensors, sum(depths.values()), fail)
    if not routers and ratios is None:
        raise fail("holds neither routers nor ratios.")
    if router != "none" and not routers:
        raise fail(f"declares '{router}' routers but holds none.")
    return RouterFile(
        name=name,
        router=router,
        model=MappingProxyType(model),
        routers=MappingProxyType({k: MappingProxyType(v) for k, v in routers.items()}),
        ratios=ratios,
        ratio_bounds=bounds,
    )


def _routers(tensors: Mapping[str, torch.Tensor], router: str, depths: Mapping[str, int], hidden: int,
             fail) -> dict[str, dict[str, torch.Tensor]]:
    """The file's routers by block label, every tensor named, placed and shaped as the router kind wants."""
    routers: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors:
        if key in ("ratios", "ratio_bounds"):
            continue
        label, param = _router_key(key, router)
        if label is None:
            expected = ", ".join(f"routers.<label>.{p}" for p in _PARAMS[router]) or "no router tensors"
            raise fail(f"unexpected tensor '{key}' for a '{router}' router file (expected {expected}, ratios, ratio_bounds).")
        kind, _, index = label.partition(".")
        if kind not in depths or not index.isdigit() or int(index) >= depths[kind]:
            known = ", ".join(f"{k}.0-{k}.{d - 1}" for k, d in sorted(depths.items()))
            raise fail(f"tensor '{key}' names block '{label}', which the model does not have ({known}).")
        routers.setdefault(label, {})[param] = tensors[key].float()
    for label, params in routers.items():
        missing = [p for p in _PARAMS[router] if p not in params]
        if missing:
            raise fail(f"block '{label}' lacks {', '.join(f'routers.{label}.{p}' for p in missing)}.")
        _check_router_shapes(fail, label, router, params, hidden)
    return routers


def _ratios(tensors: Mapping[str, torch.Tensor], blocks: int, fail) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The learned keep ratios (regions, blocks) and their region bounds, or (None, None)."""
    ratios, bounds = tensors.get("ratios"), tensors.get("ratio_bounds")
    if (ratios is None) != (bounds is None):
        raise fail("'ratios' and 'ratio_bounds' must come together.")
    if ratios is None:
        return None, None
    if ratios.ndim != 2 or ratios.shape[1] != blocks or ratios.shape[0] < 1:
        raise fail(f"'ratios' has shape {tuple(ratios.shape)}, expected (regions, {blocks}).")
    if bounds.shape != (ratios.shape[0] + 1,):
        raise fail(f"'ratio_bounds' has shape {tuple(bounds.shape)}, expected ({ratios.shape[0] + 1},).")
    if not ((ratios > 0) & (ratios <= 1)).all():
        raise fail(f"'ratios' must lie in (0, 1]; found values from {float(ratios.min()):g} to {float(ratios.max()):g}.")
    if float(bounds[0]) != 0.0 or float(bounds[-1]) != 1.0 or not bool((bounds[1:] > bounds[:-1]).all()):
        raise fail(f"'ratio_bounds' must go from 0 to 1, strictly increasing; found {bounds.tolist()}.")
    return ratios.float(), bounds.float()


def _router_key(key: str, router: str) -> tuple[str | None, str | None]:
    """'routers.single.4.fc1.weight' -> ('single.4', 'fc1.weight') when the parameter fits the router kind."""
    for param in _PARAMS[router]:
        suffix = "." + param
        if key.startswith("routers.") and key.endswith(suffix):
            label = key[len("routers."): -len(suffix)]
            if label.count(".") == 1:
                return label, param
    return None, None


def _check_router_shapes(fail, label: str, router: str, params: Mapping[str, torch.Tensor], hidden: int) -> None:
    if router == "diffcr":
        expected = {"weight": (1, hidden), "bias": (1,)}
    else:
        width = params["fc1.weight"].shape[0] if params["fc1.weight"].ndim == 2 else -1
        if width < 1:
            raise fail(f"'routers.{label}.fc1.weight' has shape {tuple(params['fc1.weight'].shape)}, expected (R, {hidden}).")
        expected = {"fc1.weight": (width, hidden), "fc1.bias": (width,), "fc2.weight": (1, width), "fc2.bias": (1,)}
    for param, shape in expected.items():
        found = tuple(params[param].shape)
        if found != shape:
            raise fail(f"'routers.{label}.{param}' has shape {found}, expected {shape}.")


def router_scores(router: str, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(B, N) float32 scores of image tokens x (B, N, D) by one block's router, higher = keep: "diffcr"
    sigmoid(weight . x + bias), "dydit" the logit fc2(gelu(fc1 x)). The Token Router and the trainer both score
    with it, so a trained file ranks tokens at inference as its student did."""
    if router == "diffcr":
        return torch.sigmoid(F.linear(x, params["weight"], params["bias"]).squeeze(-1).float())
    hidden = F.gelu(F.linear(x, params["fc1.weight"], params["fc1.bias"]))
    return F.linear(hidden, params["fc2.weight"], params["fc2.bias"]).squeeze(-1).float()


def router_flops(router: str, params: Mapping[str, torch.Tensor], tokens: float) -> float:
    """Matmul FLOPs of scoring `tokens` tokens with one block's router."""
    if router == "diffcr":
        return 2.0 * tokens * params["weight"].shape[1]
    width, hidden = params["fc1.weight"].shape
    return 2.0 * tokens * width * (hidden + 1)
