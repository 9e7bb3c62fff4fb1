"""Example workflows are generated from the real node definitions and kept up to date."""
import json
from pathlib import Path

from comfyui_dynamic_dit.dynamic_core.comfy_integration import workflows

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_example_workflows_are_current():
    rendered = workflows.render_all(workflows.registry())
    on_disk = {p.name: p.read_text() for p in (REPO_ROOT / "example_workflows").glob("*.json")}
    assert set(on_disk) == set(rendered)
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} is stale: python -m dynamic_core.comfy_integration.workflows"


def test_example_workflows_use_known_nodes_and_consistent_links():
    registry = workflows.registry()
    for path in (REPO_ROOT / "example_workflows").glob("*.json"):
        graph = json.loads(path.read_text())
        nodes = {n["id"]: n for n in graph["nodes"]}
        assert all(n["type"] in registry for n in nodes.values()), path.name
        assert any(n["type"].startswith("Dynamic") for n in nodes.values())
        for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
            assert link_id in nodes[src]["outputs"][src_slot]["links"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
            assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
