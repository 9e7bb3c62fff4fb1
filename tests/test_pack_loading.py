"""The pack loads in ComfyUI as a library and in a real server process (the shared test server)."""
import asyncio
from pathlib import Path

import nodes as comfy_nodes

from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_NODES = {
    "DynamicSpeedReport", "DynamicTelemetry", "DynamicWidthPatcher", "DynamicTokenRouter", "DynamicTDLoRALoader",
    "DynamicPatchScheduler", "DynamicBenchmarkConditioning", "DynamicReferenceModelLoader", "DynamicReferenceLatentToImage",
}


def test_every_node_is_exported():
    assert PACK_NODES <= set(NODE_CLASS_MAPPINGS)


def test_loads_through_comfyui_custom_node_loader():
    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO_ROOT)))
    for name in NODE_CLASS_MAPPINGS:
        assert name in comfy_nodes.NODE_CLASS_MAPPINGS
        info = comfy_nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert "required" in info


def test_entry_module_read_as_a_lone_file_does_not_fail():
    # pytest does this in a checkout folder whose name is no Python identifier (e.g. comfyui-dynamic-dit)
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("comfyui-dynamic-dit", str(REPO_ROOT / "__init__.py"))
    spec = importlib.util.spec_from_loader("comfyui-dynamic-dit", loader, is_package=False)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NODE_CLASS_MAPPINGS == {} and module.WEB_DIRECTORY == "./web"


def test_real_server_lists_the_nodes(comfy_server):
    info = comfy_server.get("/object_info")
    assert PACK_NODES <= set(info), sorted(n for n in info if "Dynamic" in n)
    assert info["DynamicSpeedReport"]["display_name"] == "Dynamic Speed Report"
    scripts = [e for e in comfy_server.get("/extensions") if e.endswith("dynamic_dit.js")]
    assert scripts == ["/extensions/ComfyUI-DynamicDiT/js/dynamic_dit.js"]  # once, under the pack's folder name
    output = comfy_server.log()
    problems = [line for line in output.splitlines() if "DynamicDiT" in line and ("IMPORT FAILED" in line or "Cannot import" in line or "Traceback" in line)]
    assert not problems, output[-4000:]
    assert "ComfyUI-DynamicDiT" in output  # the import-times table lists the pack
