"""Example workflows in ComfyUI's UI format (and the API format a client POSTs), generated from
compact descriptions (`example_graphs.py`).

Widget order and link types come from the real node definitions, so a workflow cannot silently
drift from the nodes. Nodes are placed in columns, each column's nodes stacked with their real sizes
plus the title bar, so no two nodes overlap. Regenerate with:

    python -m devtools.workflows   (writes example_workflows/*.json)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
ANY_TYPE = "*"  # an input that takes any type (e.g. Preview as Text)
NOTE_TYPE = "MarkdownNote"  # a frontend-only node: in the UI workflow, never in the API prompt
TITLE_HEIGHT = 30  # the frontend draws a node's title bar above its position
COLUMN_GAP, ROW_GAP = 50, 40
NOTE_COLOR, NOTE_BACKGROUND = "#432", "#653"

# Node sizes the frontend (1.32) gives these nodes, measured in the browser and rounded up; a
# node's body is never drawn smaller than this, so the layout uses at least these.
MIN_SIZES: dict[str, tuple[int, int]] = {
    "UNETLoader": (320, 90), "DualCLIPLoader": (320, 130), "CLIPTextEncode": (400, 200), "FluxGuidance": (320, 60),
    "ConditioningZeroOut": (320, 30), "EmptySD3LatentImage": (320, 110), "VAELoader": (320, 60), "KSampler": (320, 270),
    "VAEDecode": (200, 50), "SaveImage": (400, 300), "PreviewImage": (300, 300), "PreviewAny": (460, 220),
    "DynamicTelemetry": (320, 30), "DynamicSpeedReport": (520, 380), "DynamicWidthPatcher": (340, 260),
    "DynamicTokenRouter": (340, 310), "DynamicTDLoRALoader": (340, 90), "DynamicPatchScheduler": (340, 260),
    "DynamicBenchmarkConditioning": (380, 60), "DynamicReferenceModelLoader": (340, 150),
    "DynamicReferenceLatentToImage": (360, 60), "DynamicTrainer": (380, 560), "DynamicTrainedLoader": (340, 90), NOTE_TYPE: (400, 300),
    # the stock Wan video graph
    "CLIPLoader": (320, 110), "EmptyHunyuanLatentVideo": (320, 130), "ModelSamplingSD3": (320, 60),
    "KSamplerAdvanced": (340, 340), "CreateVideo": (320, 80), "SaveVideo": (400, 300),
    # the stock Flux 2 graph
    "EmptyFlux2LatentImage": (320, 110), "Flux2Scheduler": (320, 110), "KSamplerSelect": (320, 60),
    "RandomNoise": (320, 82), "BasicGuider": (320, 50), "SamplerCustomAdvanced": (320, 110),
    "CheckpointLoaderSimple": (320, 100), "EmptyLatentImage": (320, 110),
    # the stock LTX-Video graph
    "LTXVConditioning": (320, 80), "EmptyLTXVLatentVideo": (320, 130), "LTXVScheduler": (320, 160),
    "SamplerCustom": (340, 230),
    # the stock Qwen-Image Edit graph
    "LoadImage": (320, 330), "FluxKontextImageScale": (320, 30), "VAEEncode": (200, 50), "CFGNorm": (320, 60),
    "TextEncodeQwenImageEditPlus": (400, 230),
    # the stock Chroma graph
    "LoraLoaderModelOnly": (320, 82), "ModelSamplingAuraFlow": (320, 60), "T5TokenizerOptions": (320, 82), "CFGGuider": (320, 100), "BasicScheduler": (320, 110),
}


@dataclass
class Node:
    key: str
    type: str
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)  # input -> (source key, output index)
    title: str | None = None
    size: tuple[int, int] | None = None  # None: MIN_SIZES of the type
    pos: tuple[int, int] = (0, 0)  # set by `layout`


def note(key: str, text: str, size: tuple[int, int] = (400, 300)) -> Node:
    """A Markdown note explaining the workflow (shown in the frontend, not part of the prompt)."""
    return Node(key, NOTE_TYPE, {"text": text}, size=size)


def layout(columns: Sequence[Sequence[Node]], origin: tuple[int, int] = (20, 60)) -> list[Node]:
    """Place columns left to right and each column's nodes top to bottom, sized at least MIN_SIZES."""
    placed, x = [], origin[0]
    for column in columns:
        y, width = origin[1], 0
        for node in column:
            minimum = MIN_SIZES.get(node.type, (300, 100))
            size = node.size or minimum
            node.size = (max(size[0], minimum[0]), max(size[1], minimum[1]))
            node.pos = (x, y + TITLE_HEIGHT)
            y += TITLE_HEIGHT + node.size[1] + ROW_GAP
            width = max(width, node.size[0])
            placed.append(node)
        x += width + COLUMN_GAP
    return placed


def _is_widget(spec: tuple) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _inputs(node_cls: type) -> list[tuple[str, tuple]]:
    declared = node_cls.INPUT_TYPES()
    return [(name, tuple(spec)) for section in ("required", "optional") for name, spec in declared.get(section, {}).items()]


def widget_defaults(node_cls: type) -> dict[str, Any]:
    """The declared default of every widget input of a node that has one."""
    defaults = {}
    for name, spec in _inputs(node_cls):
        options = spec[1] if len(spec) > 1 else {}
        if _is_widget(spec) and "default" in options:
            defaults[name] = options["default"]
    return defaults


def _widget_values(node: Node, cls: type) -> dict[str, Any]:
    values = {**widget_defaults(cls), **node.widgets}
    known = {name for name, spec in _inputs(cls) if _is_widget(spec)}
    unknown = (set(node.widgets) - known) | (set(node.links) - {name for name, spec in _inputs(cls) if not _is_widget(spec)})
    if unknown:
        raise ValueError(f"{node.key}: {node.type} has no inputs named {sorted(unknown)}")
    missing = known - set(values)
    if missing:
        raise ValueError(f"{node.key}: no value for widgets {sorted(missing)} of {node.type}")
    return values


def _link_type(node: Node, name: str, spec: tuple, by_key: Mapping[str, Node], registry: Mapping[str, type]) -> str:
    source_key, slot = node.links[name]
    source_type = str(registry[by_key[source_key].type].RETURN_TYPES[slot])
    if str(spec[0]) not in (source_type, ANY_TYPE):
        raise ValueError(f"{node.key}.{name} expects {spec[0]}, {source_key}[{slot}] gives {source_type}")
    return source_type


def build(nodes: list[Node], registry: Mapping[str, type], title: str) -> dict:
    """A UI-format workflow (version 0.4) from placed node descriptions and the node classes in `registry`."""
    ids = {node.key: i + 1 for i, node in enumerate(nodes)}
    by_key = {node.key: node for node in nodes}
    links, out_links, ui_nodes = [], {}, []
    for order, node in enumerate(nodes):
        ui = {"id": ids[node.key], "type": node.type, "pos": list(node.pos), "size": list(node.size or (300, 100)),
              "flags": {}, "order": order, "mode": 0}
        if node.type == NOTE_TYPE:
            ui.update(inputs=[], outputs=[], properties={}, widgets_values=[node.widgets["text"]], color=NOTE_COLOR,
                      bgcolor=NOTE_BACKGROUND)
            ui_nodes.append(ui)
            continue
        cls = registry[node.type]
        values = _widget_values(node, cls)
        inputs, widgets = [], []
        for name, spec in _inputs(cls):
            if _is_widget(spec):
                widgets.append(values[name])
                if (spec[1] if len(spec) > 1 else {}).get("control_after_generate"):
                    widgets.append("fixed")
                continue
            link_id = None
            if name in node.links:
                kind = _link_type(node, name, spec, by_key, registry)
                link_id = len(links) + 1
                source_key, slot = node.links[name]
                links.append([link_id, ids[source_key], slot, ids[node.key], len(inputs), kind])
                out_links.setdefault((source_key, slot), []).append(link_id)
            inputs.append({"name": name, "type": str(spec[0]), "link": link_id})
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        ui.update(
            inputs=inputs,
            outputs=[{"name": str(names[i]), "type": str(t), "links": None, "slot_index": i}
                     for i, t in enumerate(cls.RETURN_TYPES)],
            properties={"Node name for S&R": node.type},
            widgets_values=widgets,
        )
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    # outputs are filled in after every node's inputs are known
    for ui, node in zip(ui_nodes, nodes):
        for output in ui["outputs"]:
            output["links"] = out_links.get((node.key, output["slot_index"]))
    return {
        "last_node_id": len(nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"title": title, "ds": saved_view(ui_nodes)},
        "version": 0.4,
    }


# The view a workflow opens at, in CSS pixels of a 1920-wide browser window: ComfyUI 1.32 covers the canvas's top with
# its tab bar and the workflow's name (a banner above them when it has news), its left edge with the sidebar and the
# top right with the Run toolbar; the graph starts below and right of them, as large as a full-HD window allows.
VIEW_WINDOW = (1920, 937)
VIEW_MARGINS = {"left": 110, "top": 170, "right": 40, "bottom": 60}
VIEW_SCALES = (0.5, 0.8)  # never smaller (unreadable), never larger (a small graph need not fill the screen)
TITLE_HEIGHT = 30  # LiteGraph draws a node's title above its position


def saved_view(ui_nodes: list[dict]) -> dict:
    """`extra.ds` that frames the graph in `VIEW_WINDOW` inside `VIEW_MARGINS`."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - TITLE_HEIGHT
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    m = VIEW_MARGINS
    fit = min((VIEW_WINDOW[0] - m["left"] - m["right"]) / (x1 - x0), (VIEW_WINDOW[1] - m["top"] - m["bottom"]) / (y1 - y0))
    scale = round(min(max(fit, VIEW_SCALES[0]), VIEW_SCALES[1]), 2)
    return {"scale": scale, "offset": [round(m["left"] / scale - x0, 1), round(m["top"] / scale - y0, 1)]}


def build_api(nodes: list[Node], registry: Mapping[str, type]) -> dict:
    """The same graph in the API format a client POSTs to /prompt (notes left out)."""
    ids = {node.key: str(i + 1) for i, node in enumerate(nodes)}
    prompt = {}
    for node in nodes:
        if node.type == NOTE_TYPE:
            continue
        cls = registry[node.type]
        values = _widget_values(node, cls)
        inputs = {name: values[name] for name, spec in _inputs(cls) if _is_widget(spec)}
        inputs.update({name: [ids[source], slot] for name, (source, slot) in node.links.items()})
        prompt[ids[node.key]] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title or node.type}}
    return prompt


def registry() -> dict[str, type]:
    """Every node class of the running ComfyUI host (built-in, extras and this pack)."""
    import asyncio

    import nodes

    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS

    return {**nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}


def render_all(node_registry: Mapping[str, type]) -> dict[str, str]:
    from .example_graphs import WORKFLOWS

    return {
        f"{workflow.title}.json": json.dumps(build(workflow.build(), node_registry, workflow.description), indent=2) + "\n"
        for workflow in WORKFLOWS.values()
    }


def example_path(slug: str, suffix: str = ".json") -> Path:
    """The example workflow `slug`'s file (".jpg": its thumbnail) in the pack's example_workflows/."""
    from . import host
    from .example_graphs import WORKFLOWS

    return host.pack_root() / "example_workflows" / f"{WORKFLOWS[slug].title}{suffix}"


def main() -> int:
    from . import host

    host.prepare(cpu=True)
    host.load_pack()
    target = host.pack_root() / "example_workflows"
    target.mkdir(exist_ok=True)
    for filename, text in render_all(registry()).items():
        (target / filename).write_text(text)
        print(f"wrote {target / filename}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
