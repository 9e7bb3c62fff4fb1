"""The pack loads in ComfyUI as a library and in a real server process."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_real_server_lists_the_nodes(tmp_path, comfyui_path):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "ComfyUI-DynamicDiT").symlink_to(REPO_ROOT, target_is_directory=True)
    port = _free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(tmp_path), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.time() + 240
            info = None
            while time.time() < deadline and server.poll() is None:
                try:
                    info = _get(f"http://127.0.0.1:{port}/object_info")
                    break
                except OSError:
                    time.sleep(1)
            output = log_path.read_text()
            assert info is not None, f"server did not come up:\n{output[-4000:]}"
            assert PACK_NODES <= set(info), sorted(n for n in info if "Dynamic" in n)
            assert info["DynamicSpeedReport"]["display_name"] == "Dynamic Speed Report"
            extensions = _get(f"http://127.0.0.1:{port}/extensions")
            assert any(e.endswith("dynamic_dit.js") for e in extensions)
        finally:
            server.terminate()
            server.wait(timeout=30)
    output = log_path.read_text()
    problems = [line for line in output.splitlines() if "DynamicDiT" in line and ("IMPORT FAILED" in line or "Cannot import" in line or "Traceback" in line)]
    assert not problems, output[-4000:]
    assert "ComfyUI-DynamicDiT" in output  # the import-times table lists the pack
