"""Example workflows are generated from the real node definitions, laid out without overlaps, explained
by a note each, and kept up to date."""
import itertools
import json
from pathlib import Path

import pytest

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


def test_template_titles_read_as_titles_and_try_it_comes_first():
    # The template browser titles a pack's templates by file name alone and describes them by the same name with '-'
    # and '_' as spaces (frontends 1.32.9 and 1.37.11): the file names are the titles an artist reads.
    from comfyui_dynamic_dit.devtools.example_graphs import WORKFLOWS

    titles = sorted(EXAMPLES.glob("*.json"), key=lambda path: path.stem.lower())  # the browser's A-Z order
    assert titles[0].stem == WORKFLOWS["try_it"].title and titles[1].stem == WORKFLOWS["train_reference"].title
    for path in titles:
        title = path.stem
        assert "_" not in title and " " in title and len(title) <= 48 and title == title.strip(), title
        assert title[0].isupper() or title[0].isdigit(), title
        assert title.isascii(), f"{title}: a file name every file system and URL keeps as it is"


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


# --- the Wan workflows sample as they ship, on tiny Wan models in place of the files -----------------
# Nodes that read files or only show and save what the graph made: the test gives tiny stand-ins for the
# loaders, the prompts and the empty latent, and stops at the reports (the VAE, video and preview nodes
# need the real files).
STAND_IN_TYPES = {"UNETLoader", "CLIPLoader", "VAELoader", "CLIPTextEncode", "EmptyHunyuanLatentVideo"}
DISPLAY_TYPES = {"VAEDecode", "CreateVideo", "SaveVideo", "PreviewAny"}


def _run_prompt(prompt: dict, registry: dict, stand_ins: dict, stand_in_types: set = STAND_IN_TYPES) -> dict:
    """Execute an API-format prompt in process, node by node in dependency order: outputs per node id."""
    outputs, pending = {}, dict(prompt)
    while pending:
        ready = [i for i, node in pending.items()
                 if all(v[0] in outputs for v in node["inputs"].values() if isinstance(v, list))]
        assert ready, f"a cycle or a missing node among {sorted(pending)}"
        for node_id in ready:
            node = pending.pop(node_id)
            inputs = {k: outputs[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if node["class_type"] in stand_in_types:
                outputs[node_id] = stand_ins[node["class_type"]](inputs)
                continue
            cls = registry[node["class_type"]]
            result = getattr(cls(), cls.FUNCTION)(**inputs)
            outputs[node_id] = result["result"] if isinstance(result, dict) else result
    return outputs


@pytest.mark.parametrize("name", ["wan21_t2v_1_3b", "wan22_t2v_a14b"])
def test_wan_workflows_sample_as_they_ship_on_tiny_wan_models(name):
    """Every sampling node of the Wan workflows runs with the workflow's own settings (shift 8, uni_pc 30 steps
    cfg 6; two KSamplerAdvanced splitting 20 steps), the pack's nodes at their defaults on every expert, and each
    report compares its expert's dynamic run with that expert's full-compute run."""
    import torch

    from comfyui_dynamic_dit.devtools import example_graphs
    from comfyui_dynamic_dit.demo import tiny_wan

    registry = workflows.registry()
    nodes = example_graphs.WORKFLOWS[name].build()
    prompt = workflows.build_api(nodes, registry)
    prompt = {i: n for i, n in prompt.items() if n["class_type"] not in DISPLAY_TYPES}
    config = tiny_wan.TinyWan(num_heads=8, depth=6)  # enough heads and blocks for the defaults to act on
    experts = {}  # file name -> a tiny model of its own (the two A14B experts differ)

    def unet(inputs):
        name_ = inputs["unet_name"]
        experts.setdefault(name_, tiny_wan.build_model(tiny_wan.TinyWan(num_heads=8, depth=6, seed=len(experts))))
        return (experts[name_],)

    positive, negative = tiny_wan.conditioning(config)
    texts = {example_graphs.WAN_PROMPT: positive, example_graphs.WAN_NEGATIVE: negative}
    stand_ins = {
        "UNETLoader": unet, "CLIPLoader": lambda inputs: (None,), "VAELoader": lambda inputs: (None,),
        "CLIPTextEncode": lambda inputs: (texts[inputs["text"]],),
        "EmptyHunyuanLatentVideo": lambda inputs: ({"samples": tiny_wan.latent(config, video_frames=9, height=8, width=8)},),
    }
    outputs = _run_prompt(prompt, registry, stand_ins)
    reports = [i for i, n in prompt.items() if n["class_type"] == "DynamicSpeedReport"]
    assert len(reports) == len(experts) == (2 if "a14b" in name else 1)
    for report_id in reports:
        latent, table, chart = outputs[report_id]
        assert torch.isfinite(latent["samples"]).all() and chart.shape[-1] == 3
        summary = table.splitlines()[0]
        assert "fewer FLOPs" in summary and "full compute)" in summary, summary  # against its own baseline
        assert "patch 2x" in table and "token_router: reuse keep" in table  # coarse steps, routed blocks
    assert "width: heads 0.88" in outputs[reports[0]][1]  # the noisiest steps ran narrower
    full = [outputs[i][0]["samples"] for i, n in prompt.items() if n["class_type"].startswith("KSampler") and "full" in n["_meta"]["title"]]
    dynamic = [outputs[i][0]["samples"] for i, n in prompt.items() if n["class_type"].startswith("KSampler") and "dynamic" in n["_meta"]["title"]]
    assert len(full) == len(dynamic) == len(experts)
    assert not torch.equal(full[-1], dynamic[-1])  # the chain did something


IMAGE_FAMILIES = {  # workflow -> devtools module, its tiny config (heads and blocks for the defaults), latent node, methods
    "flux2_dev_t2i": ("tiny_flux2", "TinyFlux2", dict(num_heads=8, depth=2, depth_single_blocks=4), "EmptyFlux2LatentImage",
                      ("patch_scheduler: patch 2x", "width: heads", "token_router: reuse keep")),
    "chroma_t2i": ("tiny_chroma", "TinyChroma", dict(num_heads=8, depth=2, depth_single_blocks=4), "EmptySD3LatentImage",
                   ("patch_scheduler: patch 2x", "width: heads", "token_router: reuse keep")),
    "qwen_image_t2i": ("tiny_qwen_image", "TinyQwenImage", dict(num_heads=8, depth=6), "EmptySD3LatentImage",
                       ("width: heads", "token_router: reuse keep")),
    "z_image_turbo_t2i": ("tiny_z_image", "TinyZImage", dict(num_heads=8, depth=6), "EmptySD3LatentImage",
                          ("width: heads", "token_router: reuse keep")),
    "qwen_image_edit_2509": ("tiny_qwen_image", "TinyQwenImage", dict(num_heads=8, depth=6), "VAEEncode",
                             ("width: heads", "token_router: reuse keep")),
    "sd35_large_t2i": ("tiny_sd3", "TinySD3", dict(depth=8, mmdit_x_layers=()), "EmptySD3LatentImage",
                       ("patch_scheduler: patch 2x", "width: heads", "token_router: reuse keep")),
    "pixart_sigma_t2i": ("tiny_pixart", "TinyPixArt", dict(num_heads=8, depth=5), "EmptyLatentImage",
                         ("patch_scheduler: patch 2x", "width: heads", "token_router: reuse keep")),
}
LATENT_SIDES = {"tiny_pixart": (48, 96)}  # PixArt's host positions no smaller latent or 2x grid (tiny_pixart.latent)


@pytest.mark.parametrize("name", sorted(IMAGE_FAMILIES))
def test_the_image_family_workflows_sample_as_they_ship_on_tiny_models(name):
    """An image family's workflow runs its own sampling nodes (scheduler, RandomNoise, guider, SamplerCustomAdvanced)
    on a tiny model of the family standing in for the files; the report compares the chain at its defaults with the
    full-compute run on the same noise, and every method of the chain acted on some steps."""
    import importlib

    import torch

    from comfyui_dynamic_dit.devtools import example_graphs, example_graphs_image

    module, config_class, sizes, latent_type, methods = IMAGE_FAMILIES[name]
    family = importlib.import_module(f"comfyui_dynamic_dit.demo.{module}")
    registry = workflows.registry()
    prompt = workflows.build_api(example_graphs.WORKFLOWS[name].build(), registry)
    prompt = {i: n for i, n in prompt.items() if n["class_type"] not in DISPLAY_TYPES | {"SaveImage"}}
    config = getattr(family, config_class)(**sizes)
    positive, negative = family.conditioning(config)
    prompts = {example_graphs_image.FLUX2_PROMPT, example_graphs_image.CHROMA_PROMPT, example_graphs_image.QWEN_PROMPT,
               example_graphs_image.Z_IMAGE_PROMPT, example_graphs_image.SD3_PROMPT, example_graphs_image.QWEN_EDIT_PROMPT,
               example_graphs_image.PIXART_PROMPT}
    stand_ins = {
        "UNETLoader": lambda inputs: (family.build_model(config),), "CLIPLoader": lambda inputs: (None,),
        "CheckpointLoaderSimple": lambda inputs: (family.build_model(config), None, None),
        "LoadImage": lambda inputs: (torch.zeros(1, 64, 64, 3), torch.zeros(1, 64, 64)),
        # an edit's prompt carries the image to edit as a reference latent (here a tiny one of the family)
        "TextEncodeQwenImageEditPlus": lambda inputs: (family.conditioning(config, reference=family.latent(8, 8))[
            0 if inputs["prompt"] in prompts else 1],),
        "LoraLoaderModelOnly": lambda inputs: (inputs["model"],),  # the Lightning LoRA's file: not here
        "T5TokenizerOptions": lambda inputs: (None,), "VAELoader": lambda inputs: (None,),
        "CLIPTextEncode": lambda inputs: (positive if inputs["text"] in prompts else negative,),
        latent_type: lambda inputs: ({"samples": family.latent(*LATENT_SIDES.get(module, (8, 8)))},),
    }
    outputs = _run_prompt(prompt, registry, stand_ins, stand_in_types=set(stand_ins))
    (report_id,) = [i for i, n in prompt.items() if n["class_type"] == "DynamicSpeedReport"]
    latent, table, chart = outputs[report_id]
    assert torch.isfinite(latent["samples"]).all() and chart.shape[-1] == 3
    summary = table.splitlines()[0]
    steps = next(n["inputs"]["steps"] for n in prompt.values() if "steps" in n["inputs"])
    assert "fewer FLOPs" in summary and "full compute)" in summary and f"{steps} steps" in summary, summary
    for method in methods:
        assert method in table, method


def test_the_ltxv_workflow_samples_as_it_ships_on_a_tiny_ltxv_model():
    """ComfyUI's own LTX-Video graph (LTXVConditioning, LTXVScheduler 30 steps, SamplerCustom euler cfg 3) with the pack's
    nodes at their defaults: every sampling node runs with the workflow's settings on a tiny LTX-Video in place of the
    checkpoint, and the report compares the dynamic run with the full-compute one."""
    import torch

    from comfyui_dynamic_dit.devtools import example_graphs_video as video
    from comfyui_dynamic_dit.devtools.example_graphs import WORKFLOWS
    from comfyui_dynamic_dit.demo import tiny_ltxv

    registry = workflows.registry()
    prompt = workflows.build_api(WORKFLOWS["ltxv_t2v"].build(), registry)
    prompt = {i: n for i, n in prompt.items() if n["class_type"] not in DISPLAY_TYPES}
    config = tiny_ltxv.TinyLTXV(num_heads=8, head_dim=16, depth=6)  # enough heads and blocks for the defaults to act on
    model = tiny_ltxv.build_model(config)
    positive, negative = tiny_ltxv.conditioning(config)
    positive, negative = ([[c[0][0], {"attention_mask": c[0][1]["attention_mask"]}]] for c in (positive, negative))
    texts = {video.LTXV_PROMPT: positive, video.LTXV_NEGATIVE: negative}
    stand_ins = {
        "CheckpointLoaderSimple": lambda inputs: (model, None, None), "CLIPLoader": lambda inputs: (None,),
        "CLIPTextEncode": lambda inputs: (texts[inputs["text"]],),
        "EmptyLTXVLatentVideo": lambda inputs: ({"samples": tiny_ltxv.latent(frames=2, height=4, width=6)},),
    }
    outputs = _run_prompt(prompt, registry, stand_ins, set(stand_ins))
    report = next(i for i, n in prompt.items() if n["class_type"] == "DynamicSpeedReport")
    latent, table, chart = outputs[report]
    assert torch.isfinite(latent["samples"]).all() and chart.shape[-1] == 3
    summary = table.splitlines()[0]
    assert "fewer FLOPs" in summary and "full compute)" in summary and "- 30 steps" in summary, summary
    assert "patch 2x" in table and "width: heads 0.88" in table and "token_router: reuse keep" in table
    samples = [outputs[i][0]["samples"] for i, n in prompt.items() if n["class_type"] == "SamplerCustom"]
    assert len(samples) == 2 and not torch.equal(*samples)  # the chain did something
