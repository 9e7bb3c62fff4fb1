"""The frontend extension is served once, and its imports resolve where ComfyUI serves it."""
import asyncio
import os
import re
from pathlib import Path
from urllib.parse import urljoin, urlparse

import nodes as comfy_nodes

REPO_ROOT = Path(__file__).resolve().parents[2]
WEB = REPO_ROOT / "web"
IMPORT = re.compile(r"""^\s*import\s[^'"]*?from\s+["']([^"']+)["']""", re.M)


def _frontend_root() -> Path:
    import comfyui_frontend_package

    return Path(comfyui_frontend_package.__file__).parent / "static"


def test_web_folder_is_registered_once():
    assert asyncio.run(comfy_nodes.load_custom_node(str(REPO_ROOT)))
    ours = [name for name, folder in comfy_nodes.EXTENSION_WEB_DIRS.items() if os.path.realpath(folder) == str(WEB.resolve())]
    # two names for one folder: the frontend loads the script twice and the second registerExtension throws
    assert len(ours) == 1, ours


def test_relative_imports_resolve_to_frontend_modules():
    scripts = sorted(WEB.rglob("*.js"))
    assert scripts
    root = _frontend_root()
    for script in scripts:
        served_at = f"http://host/extensions/ComfyUI-DynamicDiT/{script.relative_to(WEB).as_posix()}"
        specifiers = IMPORT.findall(script.read_text())
        assert specifiers, f"{script.name}: no imports found (the pattern is out of date?)"
        for specifier in specifiers:
            target = urlparse(urljoin(served_at, specifier)).path
            assert (root / target.lstrip("/")).is_file(), f"{script.name}: '{specifier}' resolves to {target}, which the frontend does not serve"
