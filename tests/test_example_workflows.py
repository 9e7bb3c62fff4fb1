"""Example workflows are generated from the real node definitions, laid out without overlaps, explained
by a note each, and kept up to date."""
import itertools
import json
from pathlib import Path

from comfyui_dynamic_dit.devtools import workflows

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "example_workflows"


def _graphs() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(EXAMPLES.glob("*.json"))}


def test_example_workflows_are_current():
    rendered = workflows.render_all(workflows.registry())
    on_disk = {p.name: p.read_text() for p in EXAMPLES.glob("*.json")}
    assert set(on_disk) == set(rendered)
    for name, text in rendered.items():
        assert on_disk[name] == text, f"{name} is stale: python -m devtools.workflows"


def test_example_workflows_use_known_nodes_and_consistent_links():
    registry = workflows.registry()
    for name, graph in _graphs().items():
        nodes = {n["id"]: n for n in graph["nodes"]}
        assert all(n["type"] in registry or n["type"] == workflows.NOTE_TYPE for n in nodes.values()), name
        assert any(n["type"].startswith("Dynamic") for n in nodes.values())
        for link_id, src, src_slot, dst, dst_slot, kind in graph["links"]:
            assert link_id in nodes[src]["outputs"][src_slot]["links"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
            assert nodes[src]["outputs"][src_slot]["type"] == kind
            assert nodes[dst]["inputs"][dst_slot]["type"] in (kind, workflows.ANY_TYPE)


def _box(node: dict) -> tuple[float, float, float, float]:
    """The node's rectangle on the canvas, title bar included (drawn above its position)."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - workflows.TITLE_HEIGHT, x + w, y + h


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_nodes_do_not_overlap_and_are_at_least_their_frontend_size():
    for name, graph in _graphs().items():
        for node in graph["nodes"]:
            minimum = workflows.MIN_SIZES[node["type"]]
            assert node["size"][0] >= minimum[0] and node["size"][1] >= minimum[1], (name, node["id"], node["type"])
        for a, b in itertools.combinations(graph["nodes"], 2):
            assert not _overlap(_box(a), _box(b)), f"{name}: node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']})"


def test_every_workflow_explains_itself_and_shows_the_report_table():
    registry = workflows.registry()
    for name, graph in _graphs().items():
        notes = [n for n in graph["nodes"] if n["type"] == workflows.NOTE_TYPE]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200, name
        nodes = {n["id"]: n for n in graph["nodes"]}
        for report in (n for n in nodes.values() if n["type"] == "DynamicSpeedReport"):
            table_links = report["outputs"][1]["links"] or []
            shown_by = {nodes[link[3]]["type"] for link in graph["links"] if link[0] in table_links}
            assert "PreviewAny" in shown_by and "PreviewAny" in registry, name


def test_overlap_check_sees_an_overlap():
    assert _overlap(_box({"pos": [0, 40], "size": [100, 100]}), _box({"pos": [50, 150], "size": [100, 100]}))  # title bar
    assert not _overlap(_box({"pos": [0, 40], "size": [100, 100]}), _box({"pos": [0, 171], "size": [100, 100]}))


def test_every_workflow_has_a_real_thumbnail():
    # ComfyUI's template browser shows example_workflows/<name>.jpg, or a placeholder without it
    import numpy as np
    from PIL import Image

    for name in _graphs():
        path = EXAMPLES / f"{name}.jpg"
        assert path.is_file(), f"{path.name} is missing: DYNAMIC_DIT_UPDATE_IMAGES=1 pytest tests/web/test_browser.py"
        pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        assert min(pixels.shape) >= 200 and pixels.std() > 10, f"{path.name} is no picture of the workflow"
