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


def test_one_naming_scheme_every_node_says_dynamic():
    # "Dynamic <what it is>" for the nodes that change or measure compute; "<verb> ... Dynamic DiT" for the rest
    from comfyui_dynamic_dit import NODE_DISPLAY_NAME_MAPPINGS

    for name, shown in NODE_DISPLAY_NAME_MAPPINGS.items():
        assert shown.startswith("Dynamic ") or "Dynamic DiT" in shown, shown
        assert NODE_CLASS_MAPPINGS[name].GET_NODE_INFO_V1()["display_name"] == shown, name


def _info(name: str) -> dict:
    return NODE_CLASS_MAPPINGS[name].GET_NODE_INFO_V1()


def test_the_nodes_are_on_the_v3_schema():
    from comfy_api.latest import io

    assert all(issubclass(node_class, io.ComfyNode) for node_class in NODE_CLASS_MAPPINGS.values())


ALIASES = {"DynamicWidthPatcher": {"DyDiT", "TDW"}, "DynamicTokenRouter": {"DiffCR", "SDT", "DyDiT"},
           "DynamicPatchScheduler": {"DDiT"}, "DynamicTDLoRALoader": {"DyDiT++"}}


def test_search_finds_the_methods_by_their_papers_names_where_the_host_searches_aliases():
    import dataclasses

    from comfy_api.latest import io

    if "search_aliases" not in {field.name for field in dataclasses.fields(io.Schema)}:
        pytest.skip("this ComfyUI's node schema has no search aliases (0.12 and newer do)")
    for name, aliases in ALIASES.items():
        assert aliases <= set(_info(name)["search_aliases"]), name
    # and by what an artist types: the method nodes by "faster" and by the model family
    for name in ("DynamicWidthPatcher", "DynamicTokenRouter", "DynamicPatchScheduler"):
        assert {"faster", "speed", "flux", "wan"} <= set(_info(name)["search_aliases"]), name


def test_the_trainer_is_experimental_and_the_benchmark_node_a_developers():
    import dataclasses

    from comfy_api.latest import io

    assert _info("DynamicTrainer")["experimental"] is True
    assert not any(_info(name).get("experimental") for name in NODE_CLASS_MAPPINGS if name != "DynamicTrainer")
    if "is_dev_only" in {field.name for field in dataclasses.fields(io.Schema)}:
        assert _info("DynamicBenchmarkConditioning")["dev_only"] is True
        assert not any(_info(name).get("dev_only") for name in NODE_CLASS_MAPPINGS if name != "DynamicBenchmarkConditioning")
