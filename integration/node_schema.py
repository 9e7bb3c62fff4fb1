"""The pack's nodes on ComfyUI's V3 schema (`comfy_api.latest.io`), on every host the pack runs on.

What a host's Schema lacks is left out there (search aliases and the developer flag came with ComfyUI 0.12). An input
that only one mode of a node reads says so (`shown_when`, `hidden_when`); the pack's frontend extension shows a mode's
widgets only. The inputs stay flat, so a prompt and a saved workflow read the same on every host.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from comfy_api.latest import io

_SCHEMA_FIELDS = {field.name for field in dataclasses.fields(io.Schema)}
PERCENT = dict(min=0.0, max=1.0, step=0.01)  # a start/end percent of the sampling (0 = pure noise)
FRACTION = dict(min=0.01, max=1.0, step=0.01)  # a share kept (of heads, channels, tokens)
SPEED_WORDS = ("faster", "speed", "speed up", "accelerate", "dynamic dit")  # what people type to find a faster model
FAMILY_WORDS = ("flux", "wan", "qwen", "z-image", "sd3", "pixart", "chroma")  # the families the methods run on
SHOWN_WHEN = "dynamic_dit_shown_when"  # {widget: [values]}: shown while every named widget has one of its values
HIDDEN_WHEN = "dynamic_dit_hidden_when"  # {widget: [values]}: hidden while any named widget has one of its values


def node_schema(node_id: str, display_name: str, category: str, description: str, inputs: Iterable[io.Input],
                outputs: Iterable[io.Output] = (), *, search_aliases: Iterable[str] = (), experimental: bool = False,
                developer: bool = False, output_node: bool = False, hidden: Iterable[io.Hidden] = ()) -> io.Schema:
    """A node's schema with what this host's Schema supports."""
    supported: dict[str, Any] = {}
    if "search_aliases" in _SCHEMA_FIELDS:
        supported["search_aliases"] = list(search_aliases)
    if developer and "is_dev_only" in _SCHEMA_FIELDS:
        supported["is_dev_only"] = True
    return io.Schema(node_id=node_id, display_name=display_name, category=category, description=description,
                     inputs=list(inputs), outputs=list(outputs), hidden=list(hidden), is_experimental=experimental,
                     is_output_node=output_node, **supported)


def model_to_speed_up() -> io.Model.Input:
    """The MODEL input every method node chains on."""
    return io.Model.Input("model", tooltip="The diffusion model to make faster (from Load Diffusion Model, a LoRA loader or "
                                           "another node of this pack).")


def shown_when(node_input: io.Input, **values: Iterable[str]) -> io.Input:
    """`node_input`, read only while each named widget has one of the given values (0.3.75's widget inputs take no
    `extra_dict` argument, so it is set on the input)."""
    node_input.extra_dict = {**(node_input.extra_dict or {}), SHOWN_WHEN: {w: list(v) for w, v in values.items()}}
    return node_input


def hidden_when(node_input: io.Input, **values: Iterable[str]) -> io.Input:
    """`node_input`, not read while a named widget has one of the given values."""
    node_input.extra_dict = {**(node_input.extra_dict or {}), HIDDEN_WHEN: {w: list(v) for w, v in values.items()}}
    return node_input


def hidden_unique_id(node: type[io.ComfyNode]) -> str | None:
    """The node's id in the running prompt (None when the node is called as a library, outside a prompt)."""
    hidden = getattr(node, "hidden", None)
    return getattr(hidden, "unique_id", None) if hidden is not None else None


__all__ = ["FAMILY_WORDS", "FRACTION", "HIDDEN_WHEN", "PERCENT", "SHOWN_WHEN", "SPEED_WORDS", "hidden_unique_id", "hidden_when", "model_to_speed_up", "node_schema", "shown_when"]
