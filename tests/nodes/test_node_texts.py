"""What an artist reads on the nodes: every input has a short tooltip (at most two lines of the frontend's tooltip box;
the details live in the node's description and the README), and the nodes sit in categories by what they are for."""
from __future__ import annotations

import pytest

from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

TOOLTIP_CHARACTERS = 120  # about two lines of ComfyUI's tooltip box
CATEGORIES = {
    "dynamic_dit/methods": {"DynamicWidthPatcher", "DynamicTokenRouter", "DynamicTDLoRALoader", "DynamicPatchScheduler",
                            "DynamicTrainedLoader"},
    "dynamic_dit/report": {"DynamicTelemetry", "DynamicSpeedReport", "DynamicBenchmarkConditioning"},
    "dynamic_dit/train": {"DynamicTrainer"},
    "dynamic_dit/reference": {"DynamicReferenceModelLoader", "DynamicReferenceLatentToImage"},
}


def _inputs(node_class) -> dict:
    declared = node_class.INPUT_TYPES()
    return {**declared.get("required", {}), **declared.get("optional", {})}


@pytest.mark.parametrize("name", sorted(NODE_CLASS_MAPPINGS))
def test_every_input_has_a_short_tooltip(name):
    for input_name, spec in _inputs(NODE_CLASS_MAPPINGS[name]).items():
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        tooltip = options.get("tooltip", "")
        assert tooltip, f"{name}.{input_name} has no tooltip"
        assert len(tooltip) <= TOOLTIP_CHARACTERS, f"{name}.{input_name}: {len(tooltip)} characters: {tooltip}"
    assert NODE_CLASS_MAPPINGS[name].DESCRIPTION and NODE_DISPLAY_NAME_MAPPINGS[name]


def test_the_nodes_sit_in_categories_by_purpose():
    found: dict[str, set[str]] = {}
    for name, node_class in NODE_CLASS_MAPPINGS.items():
        found.setdefault(node_class.CATEGORY, set()).add(name)
    assert found == CATEGORIES
