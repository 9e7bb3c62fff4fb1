"""Example workflows in ComfyUI's UI format, generated from compact descriptions.

Widget order and link types come from the real node definitions, so a workflow cannot silently
drift from the nodes. Regenerate with:

    python -m dynamic_core.comfy_integration.workflows   (writes example_workflows/*.json)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass
class Node:
    key: str
    type: str
    pos: tuple[int, int]
    widgets: dict[str, Any] = field(default_factory=dict)
    links: dict[str, tuple[str, int]] = field(default_factory=dict)  # input -> (source key, output index)
    title: str | None = None
    size: tuple[int, int] = (320, 130)


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


def build(nodes: list[Node], registry: Mapping[str, type], title: str) -> dict:
    """A UI-format workflow (version 0.4) from node descriptions and the node classes in `registry`."""
    ids = {node.key: i + 1 for i, node in enumerate(nodes)}
    by_key = {node.key: node for node in nodes}
    links, out_links = [], {}
    ui_nodes = []
    for order, node in enumerate(nodes):
        cls = registry[node.type]
        inputs, widgets = [], []
        values = {**widget_defaults(cls), **node.widgets}
        for name, spec in _inputs(cls):
            if _is_widget(spec):
                if name not in values:
                    raise ValueError(f"{node.key}: no value for widget '{name}' of {node.type}")
                widgets.append(values[name])
                options = spec[1] if len(spec) > 1 else {}
                if options.get("control_after_generate"):
                    widgets.append("fixed")
                continue
            link_id = None
            if name in node.links:
                source_key, slot = node.links[name]
                source_cls = registry[by_key[source_key].type]
                source_type = source_cls.RETURN_TYPES[slot]
                if str(source_type) != str(spec[0]):
                    raise ValueError(f"{node.key}.{name} expects {spec[0]}, {source_key}[{slot}] gives {source_type}")
                link_id = len(links) + 1
                links.append([link_id, ids[source_key], slot, ids[node.key], len(inputs), str(spec[0])])
                out_links.setdefault((source_key, slot), []).append(link_id)
            inputs.append({"name": name, "type": str(spec[0]), "link": link_id})
        unknown = set(node.widgets) - {name for name, spec in _inputs(cls) if _is_widget(spec)}
        unknown |= set(node.links) - {name for name, spec in _inputs(cls) if not _is_widget(spec)}
        if unknown:
            raise ValueError(f"{node.key}: {node.type} has no inputs named {sorted(unknown)}")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        ui = {
            "id": ids[node.key],
            "type": node.type,
            "pos": list(node.pos),
            "size": list(node.size),
            "flags": {},
            "order": order,
            "mode": 0,
            "inputs": inputs,
            "outputs": [
                {"name": str(names[i]), "type": str(t), "links": None, "slot_index": i} for i, t in enumerate(cls.RETURN_TYPES)
            ],
            "properties": {"Node name for S&R": node.type},
            "widgets_values": widgets,
        }
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
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
        "extra": {"title": title},
        "version": 0.4,
    }


def _flux_inputs() -> list[Node]:
    """Loaders, prompt, guidance and latent of a standard Flux.1-dev text-to-image graph."""
    return [
        Node("unet", "UNETLoader", (20, 80), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}),
        Node("clip", "DualCLIPLoader", (20, 240),
             {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux", "device": "default"}),
        Node("prompt", "CLIPTextEncode", (380, 240),
             {"text": "a photograph of a red fox in fresh snow, morning light, 85mm"}, {"clip": ("clip", 0)}, size=(380, 160)),
        Node("guidance", "FluxGuidance", (800, 240), {"guidance": 3.5}, {"conditioning": ("prompt", 0)}),
        Node("negative", "ConditioningZeroOut", (800, 380), links={"conditioning": ("prompt", 0)}),
        Node("latent", "EmptySD3LatentImage", (380, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
        Node("vae", "VAELoader", (20, 420), {"vae_name": "ae.safetensors"}),
    ]


def _sampler(key: str, model: str, pos: tuple[int, int], title: str) -> Node:
    return Node(
        key, "KSampler", pos,
        {"seed": 42, "steps": 28, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0},
        {"model": (model, 0), "positive": ("guidance", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)},
        title=title, size=(320, 262),
    )


def speed_report_workflow() -> list[Node]:
    """Full-compute Flux with the per-step telemetry and the report (chart, table, summary on the node)."""
    return _flux_inputs() + [
        Node("telemetry", "DynamicTelemetry", (380, 80), links={"model": ("unet", 0)}),
        _sampler("sampler", "telemetry", (1160, 80), "KSampler"),
        Node("report", "DynamicSpeedReport", (1520, 80), links={"model": ("telemetry", 0), "latent": ("sampler", 0)}, size=(420, 200)),
        Node("decode", "VAEDecode", (1980, 80), links={"samples": ("report", 0), "vae": ("vae", 0)}),
        Node("save", "SaveImage", (2200, 80), {"filename_prefix": "dynamic_dit"}, {"images": ("decode", 0)}, size=(400, 420)),
        Node("chart", "PreviewImage", (1520, 340), links={"images": ("report", 2)}, size=(480, 320)),
    ]


def td_lora_workflow() -> list[Node]:
    """Flux.1 with a TD-LoRA next to the same seed without it; the report shows the gates of every step
    and what the bypass costs against the baseline."""
    return _flux_inputs() + [
        Node("tdlora", "DynamicTDLoRALoader", (380, 80), {"file": "dynamic_dit/flux_td_lora.safetensors", "strength": 1.0},
             {"model": ("unet", 0)}),
        Node("baseline", "DynamicTelemetry", (800, 520), links={"model": ("unet", 0)}),
        _sampler("sampler", "tdlora", (1160, 80), "KSampler (TD-LoRA)"),
        _sampler("baseline_sampler", "baseline", (1160, 420), "KSampler (without TD-LoRA)"),
        Node("report", "DynamicSpeedReport", (1520, 80), links={
            "model": ("tdlora", 0), "latent": ("sampler", 0),
            "baseline_model": ("baseline", 0), "baseline_latent": ("baseline_sampler", 0),
        }, size=(420, 200)),
        Node("decode", "VAEDecode", (1980, 80), links={"samples": ("report", 0), "vae": ("vae", 0)}),
        Node("save", "SaveImage", (2200, 80), {"filename_prefix": "dynamic_dit_td_lora"}, {"images": ("decode", 0)}, size=(400, 420)),
        Node("chart", "PreviewImage", (1520, 340), links={"images": ("report", 2)}, size=(480, 320)),
    ]


def token_router_workflow() -> list[Node]:
    """The same seed at full compute and through the Token Router, both images, and the speed report."""
    router = dict(mode="reuse", keep_ratio_start=0.5, keep_ratio_end=0.5, first_full_blocks=2, last_full_blocks=2,
                  score="input change", router_file="none", use_file_ratios=True, start_percent=0.0, end_percent=1.0,
                  block_overrides="")
    return _flux_inputs() + [
        Node("telemetry", "DynamicTelemetry", (380, 80), links={"model": ("unet", 0)}, title="Full compute (baseline)"),
        _sampler("baseline", "telemetry", (1160, 80), "KSampler (full compute)"),
        Node("base_decode", "VAEDecode", (1520, 80), links={"samples": ("baseline", 0), "vae": ("vae", 0)}),
        Node("base_preview", "PreviewImage", (1760, 80), links={"images": ("base_decode", 0)}, size=(400, 420)),
        Node("router", "DynamicTokenRouter", (800, 540), router, {"model": ("unet", 0)}, size=(340, 390)),
        _sampler("sampler", "router", (1160, 560), "KSampler (Token Router)"),
        Node("report", "DynamicSpeedReport", (1520, 560),
             links={"model": ("router", 0), "latent": ("sampler", 0), "baseline_model": ("telemetry", 0),
                    "baseline_latent": ("baseline", 0)}, size=(420, 200)),
        Node("decode", "VAEDecode", (1980, 560), links={"samples": ("report", 0), "vae": ("vae", 0)}),
        Node("save", "SaveImage", (2200, 560), {"filename_prefix": "dynamic_dit_token_router"}, {"images": ("decode", 0)},
             size=(400, 420)),
        Node("chart", "PreviewImage", (1520, 800), links={"images": ("report", 2)}, size=(480, 320)),
    ]


def width_workflow() -> list[Node]:
    """Full compute next to the Dynamic Width Patcher ('balanced'), same seed; the report compares them."""
    return _flux_inputs() + [
        Node("baseline", "DynamicTelemetry", (380, 80), links={"model": ("unet", 0)}),
        Node("width", "DynamicWidthPatcher", (380, 640), {"preset": "balanced"}, {"model": ("unet", 0)}, size=(360, 330)),
        _sampler("sampler_full", "baseline", (1160, 80), "KSampler (full compute)"),
        _sampler("sampler_width", "width", (1160, 400), "KSampler (dynamic width)"),
        Node("report", "DynamicSpeedReport", (1520, 400), links={
            "model": ("width", 0), "latent": ("sampler_width", 0),
            "baseline_model": ("baseline", 0), "baseline_latent": ("sampler_full", 0),
        }, size=(420, 200)),
        Node("decode_full", "VAEDecode", (1520, 80), links={"samples": ("sampler_full", 0), "vae": ("vae", 0)}),
        Node("save_full", "SaveImage", (1760, 80), {"filename_prefix": "dynamic_dit_full"}, {"images": ("decode_full", 0)}, size=(400, 300)),
        Node("decode_width", "VAEDecode", (1980, 400), links={"samples": ("report", 0), "vae": ("vae", 0)}),
        Node("save_width", "SaveImage", (2200, 400), {"filename_prefix": "dynamic_dit_width"}, {"images": ("decode_width", 0)}, size=(400, 420)),
        Node("chart", "PreviewImage", (1520, 660), links={"images": ("report", 2)}, size=(480, 320)),
    ]


def patch_scheduler_workflow() -> list[Node]:
    """DDiT coarse patches against a full-compute baseline of the same seed, compared in the report."""
    return _flux_inputs() + [
        Node("telemetry", "DynamicTelemetry", (380, 80), links={"model": ("unet", 0)}),
        _sampler("baseline", "telemetry", (1160, 80), "KSampler (full compute)"),
        Node("ddit", "DynamicPatchScheduler", (380, 620), links={"model": ("unet", 0)}, size=(380, 330)),
        _sampler("sampler", "ddit", (1160, 420), "KSampler (Dynamic Patch Scheduler)"),
        Node("report", "DynamicSpeedReport", (1520, 420),
             links={"model": ("ddit", 0), "latent": ("sampler", 0), "baseline_model": ("telemetry", 0),
                    "baseline_latent": ("baseline", 0)}, size=(420, 200)),
        Node("decode", "VAEDecode", (1980, 420), links={"samples": ("report", 0), "vae": ("vae", 0)}),
        Node("save", "SaveImage", (2200, 420), {"filename_prefix": "dynamic_dit_ddit"}, {"images": ("decode", 0)}, size=(400, 420)),
        Node("chart", "PreviewImage", (1520, 680), links={"images": ("report", 2)}, size=(480, 320)),
        Node("decode_full", "VAEDecode", (1520, 80), links={"samples": ("baseline", 0), "vae": ("vae", 0)}),
        Node("preview_full", "PreviewImage", (1760, 80), links={"images": ("decode_full", 0)}, size=(300, 300)),
    ]


def benchmark_conditioning_workflow() -> list[Node]:
    """Prompt and negative as conditioning files for `python -m dynamic_core.comfy_integration.bench --model ...`."""
    inputs = [node for node in _flux_inputs() if node.key in ("clip", "prompt", "guidance", "negative")]
    return inputs + [
        Node("save_positive", "DynamicBenchmarkConditioning", (1160, 240), {"filename_prefix": "dynamic_dit_bench/fox"},
             {"conditioning": ("guidance", 0)}, size=(380, 110)),
        Node("save_negative", "DynamicBenchmarkConditioning", (1160, 380), {"filename_prefix": "dynamic_dit_bench/negative"},
             {"conditioning": ("negative", 0)}, size=(380, 110)),
    ]


WORKFLOWS = {
    "flux_speed_report": ("Flux.1 with per-step speed telemetry", speed_report_workflow),
    "flux_td_lora": ("Flux.1 with a TD-LoRA (timestep-gated LoRA experts)", td_lora_workflow),
    "flux_token_router": ("Flux.1 Token Router against full compute", token_router_workflow),
    "flux_dynamic_width": ("Flux.1 with the Dynamic Width Patcher against full compute", width_workflow),
    "flux_patch_scheduler": ("Flux.1 with DDiT dynamic patch sizes, compared with full compute", patch_scheduler_workflow),
    "benchmark_conditioning": ("Conditioning files for the command-line benchmark", benchmark_conditioning_workflow),
}


def registry() -> dict[str, type]:
    """Every node class of the running ComfyUI host (built-in, extras and this pack)."""
    import asyncio

    import nodes

    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS

    return {**nodes.NODE_CLASS_MAPPINGS, **NODE_CLASS_MAPPINGS}


def render_all(node_registry: Mapping[str, type]) -> dict[str, str]:
    return {
        f"{name}.json": json.dumps(build(describe(), node_registry, title), indent=2) + "\n"
        for name, (title, describe) in WORKFLOWS.items()
    }


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
