"""Guards of the design: dynamic_core is plain PyTorch, and no ComfyUI forward code is copied."""
import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "server", "node_helpers"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_only_the_integration_package_imports_comfyui():
    core = REPO_ROOT / "dynamic_core"
    integration = core / "comfy_integration"
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(_imported_roots(path) & HOST_MODULES)
        for path in core.rglob("*.py")
        if integration not in path.parents and _imported_roots(path) & HOST_MODULES
    }
    assert not offenders
    assert _imported_roots(integration / "patching.py") & HOST_MODULES  # the guard can see imports


def test_no_copied_forward_code():
    copied = []
    for path in REPO_ROOT.glob("**/*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in {"forward_orig", "_forward"}:
                copied.append(f"{path.relative_to(REPO_ROOT)}:{node.name}")
    assert not copied
