"""Guards of the design: dynamic_core is plain PyTorch, and no ComfyUI forward code is copied."""
import ast
from pathlib import Path

import pytest

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


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names, relative ones resolved against the file's package."""
    package = path.relative_to(REPO_ROOT).parent.parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join((*base, node.module)) if node.module else ".".join(base)
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


# Argument names of the families' blocks and model calls (Flux: img, txt, vec, pe; Wan: x, e, freqs, context).
FAMILY_ARGUMENTS = {"img", "txt", "vec", "pe", "x", "e", "freqs", "context", "context_img_len", "timestep", "guidance"}


@pytest.mark.parametrize("folder", ["methods", "training"])
def test_methods_and_the_trainer_talk_to_adapters_only_through_capabilities(folder):
    """No file under methods/ or training/ imports an adapter family or reads a family's argument names."""
    families = {path.name for path in (REPO_ROOT / "dynamic_core" / "adapters").iterdir() if (path / "__init__.py").exists()}
    imports, reads = {}, {}
    for path in (REPO_ROOT / "dynamic_core" / folder).rglob("*.py"):
        name = str(path.relative_to(REPO_ROOT))
        family_imports = sorted(m for m in _imported_modules(path) if any(f"adapters.{f}" in m for f in families))
        if family_imports:
            imports[name] = family_imports
        subscripts = sorted(
            node.slice.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value in FAMILY_ARGUMENTS
        )
        if subscripts:
            reads[name] = subscripts
    assert families >= {"flux"}  # the guard sees the family packages
    assert not imports
    assert not reads


def test_the_runtime_does_not_import_developer_tooling():
    offenders = {}
    for folder in ("nodes", "dynamic_core"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            tooling = sorted(m for m in _imported_modules(path) if m.split(".")[0] == "devtools" or ".devtools" in m)
            if tooling:
                offenders[str(path.relative_to(REPO_ROOT))] = tooling
    assert not offenders
    assert "devtools.host" in _imported_modules(REPO_ROOT / "devtools" / "demo.py")  # the guard resolves relative imports
