"""The product in a real browser: headless Chromium opens the frontend of a real ComfyUI server with the
pack, loads every example workflow, queues the try-it workflow and watches the report node draw its chart.

Screenshots are kept under out/browser/ (gitignored). With DYNAMIC_DIT_UPDATE_IMAGES=1 the test runs the
try-it workflow exactly as it ships and writes the workflow thumbnails (example_workflows/*.jpg) and the
README's pictures (docs/try_it_*, docs/train_reference_*: at the saved view and at 100 %); run this module alone then (the server test's
run of the same prompt would be answered from ComfyUI's cache):

    DYNAMIC_DIT_UPDATE_IMAGES=1 .venv/bin/python -m pytest tests/web/test_browser.py
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

from support.chromium import Chromium, find_chromium

from comfyui_dynamic_dit.devtools.workflows import example_path

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "out" / "browser"
UPDATE_IMAGES = os.environ.get("DYNAMIC_DIT_UPDATE_IMAGES") == "1"
RUN_COLOR = (86, 182, 255)  # web/js/dynamic_dit.js COLORS.run
BASELINE_COLOR = (128, 132, 140)  # COLORS.baseline
PACK_MARKERS = ("dynamic_dit", "DynamicDiT", "ComfyUI-DynamicDiT", "dynamic-dit")
STEPS = 8
TRY_IT = example_path("try_it")


@pytest.fixture(scope="module")
def browser(comfy_server):
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it): the browser test did not run")
    chromium = Chromium(binary)
    try:
        chromium.navigate(comfy_server.url)
        chromium.wait_for("window.app?.graph && window.LiteGraph && app.extensions?.some(e => e.name === 'dynamic_dit.report')", 90)
        chromium.evaluate("app.extensionManager.focusMode = true")  # the graph alone, no menus over it
        yield chromium
    finally:
        chromium.close()


def _pack_errors(chromium: Chromium, since: int = 0) -> list[dict]:
    """Console errors and uncaught exceptions that come from this pack (its script, its files, its nodes),
    from console message `since` on."""
    return [
        m for m in chromium.console[since:]
        if m["level"] == "error" and "api.comfy.org" not in m.get("url", "")  # the frontend's registry look-ups (offline)
        and any(marker in m["text"] + m.get("url", "") for marker in PACK_MARKERS)
    ]


def _close_dialogs(chromium: Chromium) -> None:
    for _ in range(5):
        if not chromium.evaluate("!!document.querySelector('.p-dialog')"):
            return
        chromium.send("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Escape", "code": "Escape", "windowsVirtualKeyCode": 27})
        chromium.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Escape", "code": "Escape", "windowsVirtualKeyCode": 27})
        time.sleep(0.3)


def _frames(chromium: Chromium, count: int = 3) -> None:
    """Wait until the page has drawn `count` more frames (the canvas and the DOM widgets that follow it)."""
    chromium.evaluate("new Promise(done => { let left = %d; const next = () => --left ? requestAnimationFrame(next) : done(); "
                      "requestAnimationFrame(next); })" % count)


def _load(chromium: Chromium, graph: dict, name: str) -> dict:
    chromium.evaluate(f"app.loadGraphData({json.dumps(graph)}, true, true, {json.dumps(name)})")
    _frames(chromium)
    state = json.loads(chromium.evaluate("""JSON.stringify({
        missingDialog: !!document.querySelector('.comfy-missing-nodes'),
        unknown: app.graph._nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
        boxes: app.graph._nodes.map(n => [n.id, n.type, Array.from(n.getBounding())]),
    })"""))
    _close_dialogs(chromium)
    return state


def _fit_and_capture(chromium: Chromium, path: Path, node_ids: list[int] | None = None, margin: int = 20) -> Path:
    """Fit the view to the given nodes (default: all) and capture just that region of the canvas."""
    clip = json.loads(chromium.evaluate("""(() => {
        const ids = %s;
        const nodes = app.graph._nodes.filter(n => !ids || ids.includes(n.id));
        const boxes = nodes.map(n => n.getBounding());
        const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
        const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
        const rect = app.canvas.canvas.getBoundingClientRect();
        const width = rect.width - 2 * %d, height = rect.height - 2 * %d;
        const scale = Math.min(1.0, width / (x1 - x0), height / (y1 - y0));
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(rect.width - (x1 - x0) * scale) / 2 / scale - x0, (rect.height - (y1 - y0) * scale) / 2 / scale - y0];
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
        const left = rect.left + (x0 + app.canvas.ds.offset[0]) * scale, top = rect.top + (y0 + app.canvas.ds.offset[1]) * scale;
        return JSON.stringify({x: left - %d, y: top - %d, width: (x1 - x0) * scale + 2 * %d, height: (y1 - y0) * scale + 2 * %d, scale: 1});
    })()""" % (json.dumps(node_ids), margin, margin, margin, margin, margin, margin)))
    _frames(chromium)  # DOM widgets follow the canvas on the next frame
    return chromium.screenshot(path, clip)


def _ids_of(chromium: Chromium, types: list[str]) -> list[int]:
    return chromium.evaluate(f"app.graph._nodes.filter(n => {json.dumps(types)}.includes(n.type)).map(n => n.id)")


def _chart_state(chromium: Chromium, title: str = "Speed Report (defaults)") -> dict:
    """What the report node titled `title` shows: its data, summary, and how many pixels of its chart are in the
    run's and the baseline's colours (read back from the node's canvas)."""
    return json.loads(chromium.evaluate("""(() => {
        const node = app.graph._nodes.find(n => n.type === 'DynamicSpeedReport' && n.title === %s);
        const view = node?.dynamicDit;
        if (!view) return JSON.stringify({missing: true});
        const canvas = view.canvas;
        const pixels = canvas.width && canvas.height ? canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data : [];
        const count = (rgb) => { let n = 0; for (let i = 0; i < pixels.length; i += 4)
            if (Math.abs(pixels[i] - rgb[0]) < 3 && Math.abs(pixels[i + 1] - rgb[1]) < 3 && Math.abs(pixels[i + 2] - rgb[2]) < 3) n++; return n; };
        return JSON.stringify({steps: view.data?.steps?.length ?? 0, done: !!view.data?.done, full: !!view.data?.full_compute,
            run: count(%s), baseline: count(%s), summary: view.summary.textContent, id: node.id,
            summaryCut: view.summary.scrollHeight > view.summary.clientHeight + 1,
            headline: view.headline.textContent, headlineShown: view.headline.style.display !== 'none',
            summaryShown: view.summary.style.display !== 'none',
            headlineCut: view.headline.scrollHeight > view.headline.clientHeight + 1,
            headlinePx: parseFloat(view.headline.style.fontSize) * app.canvas.ds.scale,
            size: [canvas.clientWidth, canvas.clientHeight]});
    })()""" % (json.dumps(title), json.dumps(RUN_COLOR), json.dumps(BASELINE_COLOR))))


def test_extension_loads_once_without_errors(browser):
    assert browser.evaluate("app.extensions.filter(e => e.name === 'dynamic_dit.report').length") == 1
    assert not _pack_errors(browser), _pack_errors(browser)  # e.g. a failed import, or a second registration


def _mode_widgets(chromium: Chromium, node_type: str, mode_widget: str, modes: list[str]) -> dict:
    """The hidden widgets of a new node in each mode, how many values it saves and queues, and what a node loaded from
    the last mode's saved values hides."""
    return json.loads(chromium.evaluate("""(() => {
        const node = LiteGraph.createNode(%s);
        app.graph.add(node);
        const hidden = (n) => n.widgets.filter(w => w.hidden).map(w => w.name).sort();
        const mode = node.widgets.find(w => w.name === %s);
        const out = {hidden: {}};
        for (const value of %s) {
            mode.value = value;
            mode.callback?.(value);
            out.hidden[value] = hidden(node);
        }
        out.widgets = node.widgets.length;
        const saved = node.serialize();
        out.saved = saved.widgets_values.length;
        const loaded = LiteGraph.createNode(%s);
        app.graph.add(loaded);
        loaded.configure({...saved, id: loaded.id});
        out.loaded = hidden(loaded);
        app.graph.remove(node);
        app.graph.remove(loaded);
        return JSON.stringify(out);
    })()""" % (json.dumps(node_type), json.dumps(mode_widget), json.dumps(modes), json.dumps(node_type))))


def test_a_mode_shows_only_the_widgets_it_reads(browser):
    """The Patch Scheduler's auto mode shows tau and the other measures, manual its schedule, 'as trained' neither;
    the Width Patcher's custom and target presets show their own numbers. Hidden widgets keep their values and places
    in the saved workflow (and so in a queued prompt), and a loaded workflow's mode decides what shows."""
    auto = ["last_native_steps", "max_patch_factor", "percentile", "tau"]
    scheduler = _mode_widgets(browser, "DynamicPatchScheduler", "mode", ["auto", "manual", "as trained"])
    assert scheduler["hidden"] == {"auto": ["manual_schedule"], "manual": auto, "as trained": sorted([*auto, "manual_schedule"])}
    assert scheduler["saved"] == scheduler["widgets"] and scheduler["loaded"] == scheduler["hidden"]["as trained"]
    width = _mode_widgets(browser, "DynamicWidthPatcher", "preset", ["quality", "custom", "target FLOPs"])
    assert width["hidden"] == {"quality": ["clean_width", "noisy_width", "target_flops"],
                               "custom": ["target_flops"], "target FLOPs": ["clean_width", "noisy_width"]}
    assert width["saved"] == width["widgets"] and width["loaded"] == width["hidden"]["target FLOPs"]
    trainer = _mode_widgets(browser, "DynamicTrainer", "parts", ["width + TD-LoRA", "coarse patches (DDiT)"])
    assert trainer["hidden"] == {"width + TD-LoRA": ["coarse_schedule"],
                                 "coarse patches (DDiT)": ["experts", "target_flops", "width_parts"]}
    recipe = json.loads(browser.evaluate("""(() => {
        const node = LiteGraph.createNode('DynamicTrainer');
        app.graph.add(node);
        const recipe = node.widgets.find(w => w.name === 'recipe');
        recipe.value = recipe.options.values[1];
        recipe.callback?.(recipe.value);
        const hidden = node.widgets.filter(w => w.hidden).map(w => w.name).sort();
        app.graph.remove(node);
        return JSON.stringify(hidden);
    })()"""))
    # a measured recipe decides the parts and every knob: they leave the node, what stays is the run's own
    assert {"parts", "target_flops", "steps", "seeds", "experts", "rank", "on_policy_rounds", "on_policy_steps"} <= set(recipe)
    assert not {"filename", "sampling_steps", "cfg", "batch", "resume"} & set(recipe)


def test_template_browser_gets_a_thumbnail_of_every_workflow(browser):
    # The template browser shows /api/workflow_templates/<pack folder>/<workflow>.jpg, or a placeholder.
    names = [p.stem for p in sorted((REPO_ROOT / "example_workflows").glob("*.json"))]
    sizes = json.loads(browser.evaluate("""(async () => JSON.stringify(await Promise.all(%s.map(async name => {
        const response = await fetch('/api/workflow_templates/ComfyUI-DynamicDiT/' + name + '.jpg');
        if (!response.ok) return [name, response.status];
        const image = await createImageBitmap(await response.blob());
        return [name, image.width, image.height];
    }))))()""" % json.dumps(names)))
    assert all(len(size) == 3 and size[1] >= 320 and size[2] >= 160 for size in sizes), sizes


SAVED_VIEW = """(() => {
    const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
    const hidden = [];
    for (const node of app.graph._nodes) {
        const [x, y] = [rect.left + (node.pos[0] + ds.offset[0] + 8) * ds.scale, rect.top + (node.pos[1] + ds.offset[1] - 15) * ds.scale];
        if (x < 0 || y < 0 || x > window.innerWidth || y > window.innerHeight) continue;
        if (document.elementFromPoint(x, y) !== app.canvas.canvas) hidden.push(node.title || node.type);
    }
    return JSON.stringify({scale: ds.scale, hidden});
})()"""


def test_every_example_workflow_loads_without_missing_nodes_or_overlaps(browser):
    """Each workflow loads with every node known and none overlapping; at the view it is saved with, in a full-HD
    window with ComfyUI's menus shown (tab bar, sidebar, Run toolbar, the workflow's name, a news banner), every node
    title on screen is canvas, not under a bar, drawn at least half size; then its thumbnail is taken."""
    since = len(browser.console)
    for path in sorted((REPO_ROOT / "example_workflows").glob("*.json")):
        browser.evaluate("app.extensionManager.focusMode = false")
        try:
            state = _load(browser, json.loads(path.read_text()), path.stem)
            view = json.loads(browser.evaluate(SAVED_VIEW))
        finally:
            browser.evaluate("app.extensionManager.focusMode = true")
        assert not view["hidden"] and view["scale"] >= 0.5, (path.name, view)
        assert not state["missingDialog"] and not state["unknown"], (path.name, state["unknown"])
        boxes = state["boxes"]
        for i, (id_a, type_a, a) in enumerate(boxes):
            for id_b, type_b, b in boxes[i + 1:]:
                overlap = a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
                assert not overlap, f"{path.name}: {type_a} #{id_a} overlaps {type_b} #{id_b} as the frontend draws them"
        if UPDATE_IMAGES and path != TRY_IT:  # try_it's thumbnail shows the run, below
            _thumbnail(_fit_and_capture(browser, ARTIFACTS / f"{path.stem}.png"), path.with_suffix(".jpg"))
        if UPDATE_IMAGES and path == example_path("train_reference"):
            _readme_pictures(browser, json.loads(path.read_text()), "train_reference", _ids_of(browser, ["DynamicTrainer"]))
    assert not _pack_errors(browser, since), _pack_errors(browser, since)


def test_missing_node_check_sees_a_missing_node(browser):
    graph = json.loads(TRY_IT.read_text())
    graph["nodes"][1]["type"] = "NoSuchNodeAnywhere"
    state = _load(browser, graph, "missing")
    assert state["missingDialog"] and state["unknown"] == ["NoSuchNodeAnywhere"]


def test_saved_view_check_sees_a_title_under_the_tab_bar(browser):
    graph = json.loads(TRY_IT.read_text())
    graph["extra"]["ds"] = {"scale": 1.0, "offset": [300, -graph["nodes"][0]["pos"][1] + 40]}  # the top row at 40 px
    browser.evaluate("app.extensionManager.focusMode = false")
    try:
        _load(browser, graph, "under the tab bar")
        view = json.loads(browser.evaluate(SAVED_VIEW))
    finally:
        browser.evaluate("app.extensionManager.focusMode = true")
    assert view["hidden"], view


def test_try_it_draws_the_chart_live_and_keeps_it(browser):
    since = len(browser.console)
    graph = json.loads(TRY_IT.read_text())
    steps = 16
    if not UPDATE_IMAGES:  # the images show the workflow as it ships; the test runs a lighter variant of it
        steps = STEPS
        for node in graph["nodes"]:
            if node["type"] == "DynamicReferenceModelLoader":  # not the server test's class: nothing is cached
                node["widgets_values"][0] = "moon"
            if node["type"] == "KSampler":  # fewer steps than the workflow's 16: the browser shares the CPU cores
                node["widgets_values"][2] = STEPS
    _load(browser, graph, TRY_IT.stem)
    initial = _chart_state(browser)
    assert not initial.get("missing") and initial["steps"] == 0 and initial["run"] == 0
    assert initial["size"][0] >= 400 and initial["size"][1] >= 150, initial["size"]  # readable at the default size
    browser.evaluate("app.queuePrompt(0, 1)")
    samples, deadline = [], time.time() + 150
    while time.time() < deadline:
        state = _chart_state(browser)
        samples.append(state)
        if state["summary"].startswith("done:"):
            break
        time.sleep(0.2)
    final = samples[-1]
    assert final["summary"].startswith("done: x"), final["summary"]
    live = [s for s in samples if 0 < s["steps"] < steps and not s["done"]]
    assert any(s["full"] for s in live) and any(not s["full"] for s in live), "no live chart during both runs"
    assert all(s["baseline"] > 100 for s in live if s["full"]), "the baseline run's bars were not drawn"
    assert all(s["run"] == 0 for s in live if s["full"]), "the baseline run's legend or bars use the other run's colour"
    assert all("fewer FLOPs" not in s["summary"] for s in live if s["full"]), "a full-compute run called x1.00 fewer FLOPs"
    assert any(s["run"] > 100 and s["baseline"] > 100 for s in live if not s["full"]), "no live bars next to the baseline"
    assert "step " in next(s for s in live if not s["full"])["summary"]  # the summary follows the run
    assert final["steps"] == steps and final["run"] > 300 and final["baseline"] > 300
    assert "s full compute)" in final["summary"] and not final["summaryCut"], final
    assert " dB PSNR, SSIM 0." in final["summary"] and "against full compute's image" in final["summary"], final
    time.sleep(1.0)
    kept = _chart_state(browser)  # still there after the run
    assert kept["summary"] == final["summary"] and kept["run"] > 300
    # zoomed out to the saved view, each report shows its headline numbers at a readable size; at 100 % the summary
    for scale, shown in ((graph["extra"]["ds"]["scale"], "headlineShown"), (1.0, "summaryShown")):
        browser.evaluate(f"app.canvas.ds.scale = {scale}; app.canvas.setDirty(true, true); app.canvas.draw(true, true)")
        time.sleep(0.3)
        for title in ("Speed Report (defaults)", "Speed Report (trained file)"):
            view = _chart_state(browser, title)
            assert view[shown] and view["headlineShown"] != view["summaryShown"], (scale, view)
            assert "fewer FLOPs · x" in view["headline"] and " dB PSNR" in view["headline"], view["headline"]
            if shown == "headlineShown":
                assert view["headlinePx"] >= 11.5 and not view["headlineCut"], view
    # the shipped trained file's report: its FLOPs, model-time speedup and PSNR read off the node (the server test
    # holds the numbers at the workflow's 16 steps; this run has fewer)
    trained = _chart_state(browser, "Speed Report (trained file)")
    assert trained["done"] and trained["steps"] == steps and not trained["summaryCut"], trained
    flops, speed, psnr = (re.search(pattern, trained["summary"]) for pattern in (
        r"x(\d+\.\d\d) fewer FLOPs", r"x(\d+\.\d\d) (faster|slower) model time", r"(\d+\.\d) dB PSNR"))
    assert flops and float(flops[1]) > 1.5 and speed and psnr and float(psnr[1]) > 18, trained["summary"]
    browser.wait_for("app.graph._nodes.filter(n => n.type === 'PreviewImage').every(n => n.imgs?.length)", 30)
    shot = _fit_and_capture(browser, ARTIFACTS / "try_it_after_run.png", _ids_of(browser, ["DynamicSpeedReport", "PreviewImage"]))
    if UPDATE_IMAGES:
        _thumbnail(shot, TRY_IT.with_suffix(".jpg"))
        (REPO_ROOT / "docs" / "try_it_after_run.png").write_bytes(shot.read_bytes())
        _readme_pictures(browser, graph, "try_it", _ids_of(browser, ["DynamicSpeedReport"]))
    browser.evaluate("app.loadGraphData(app.graph.serialize(), true, true, 'try_it reloaded')")
    time.sleep(0.5)
    reloaded = _chart_state(browser)  # and when the workflow is loaded again (saved, tab reopened)
    assert reloaded["summary"] == final["summary"] and reloaded["run"] > 300 and reloaded["id"] == final["id"]
    assert not _pack_errors(browser, since), _pack_errors(browser, since)


def test_the_train_node_shows_its_phase_on_the_node_while_it_trains(browser):
    """The phase text the Train node sends (ComfyUI's progress text) is drawn on the node in the browser, from the
    teacher's recording to the end; the example workflow, made short."""
    graph = json.loads(example_path("train_reference").read_text())
    trainer = next(node for node in graph["nodes"] if node["type"] == "DynamicTrainer")
    values = dict(zip(("parts", "target_flops", "steps", "filename", "sampling_steps"), trainer["widgets_values"]))
    assert values["steps"] == 100 and values["sampling_steps"] == 16, values  # the saved order of the widgets
    trainer["widgets_values"][2], trainer["widgets_values"][3], trainer["widgets_values"][4] = 3, "trained/browser_check", 4
    for node in graph["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = 4
    _load(browser, graph, "train")
    browser.evaluate("app.queuePrompt(0, 1)")
    texts, deadline = [], time.time() + 120
    while time.time() < deadline:
        text = browser.evaluate("""(() => { const node = app.graph._nodes.find(n => n.type === 'DynamicTrainer');
            return node.widgets?.find(w => w.name === '$$node-text-preview')?.value ?? ''; })()""")
        if text and (not texts or texts[-1] != text):
            texts.append(text)
        if text.startswith("done: "):
            break
        time.sleep(0.1)
    assert any(t.startswith("recording the teacher: sampling run") or t.startswith("training: step") for t in texts), texts
    assert texts and texts[-1].startswith("done: FLOPs") and "after 3 steps" in texts[-1], texts


def _readme_pictures(chromium: Chromium, graph: dict, stem: str, node_ids: list[int]) -> None:
    """The README's pictures of a workflow, with ComfyUI's menus shown as an artist sees them: the window at the view
    the workflow is saved with, and at 100 % zoom with `node_ids` from the top-left corner."""
    from PIL import Image

    chromium.evaluate("app.extensionManager.focusMode = false")
    try:
        ds = graph["extra"]["ds"]
        views = {"saved_view": f"app.canvas.ds.scale = {ds['scale']}; app.canvas.ds.offset = {json.dumps(ds['offset'])};",
                 "100": """const ids = %s, boxes = app.graph._nodes.filter(n => ids.includes(n.id)).map(n => n.getBounding());
                     app.canvas.ds.scale = 1;
                     app.canvas.ds.offset = [120 - Math.min(...boxes.map(b => b[0])), 170 - Math.min(...boxes.map(b => b[1]))];"""
                 % json.dumps(node_ids)}
        for name, view in views.items():
            chromium.evaluate(f"(() => {{ {view} app.canvas.setDirty(true, true); app.canvas.draw(true, true); }})()")
            time.sleep(0.5)
            shot = chromium.screenshot(ARTIFACTS / f"{stem}_{name}.png")
            Image.open(shot).convert("RGB").save(REPO_ROOT / "docs" / f"{stem}_{name}.jpg", quality=85)
    finally:
        chromium.evaluate("app.extensionManager.focusMode = true")


def _thumbnail(screenshot: Path, target: Path, width: int = 640) -> None:
    from PIL import Image

    image = Image.open(screenshot).convert("RGB")
    image.thumbnail((width, width))
    image.save(target, quality=85)
