"""Guards of the design: core is plain PyTorch, and no ComfyUI forward code is copied."""
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


# The plain-PyTorch floors: the executor and its kin, the model families, the methods, the trainer. Inside a method's
# folder only its node (`node.py`) and its ComfyUI file handling (`comfy_*.py`) may talk to ComfyUI.
PLAIN_FOLDERS = ("core", "families", "methods", "training")
RUNTIME_FOLDERS = (*PLAIN_FOLDERS, "integration", "nodes", "demo")


def _speaks_to_comfyui(path: Path) -> bool:
    return path.parent.parent.name == "methods" and (path.name == "node.py" or path.name.startswith("comfy_"))


def test_only_the_integration_seam_and_the_nodes_import_comfyui():
    offenders = {
        str(path.relative_to(REPO_ROOT)): sorted(_imported_roots(path) & HOST_MODULES)
        for folder in PLAIN_FOLDERS for path in (REPO_ROOT / folder).rglob("*.py")
        if not _speaks_to_comfyui(path) and _imported_roots(path) & HOST_MODULES
    }
    assert not offenders
    assert _imported_roots(REPO_ROOT / "integration" / "patching.py") & HOST_MODULES  # the guard can see imports
    assert _imported_roots(REPO_ROOT / "methods" / "td_lora" / "comfy_files.py") & HOST_MODULES


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
    families = {path.name for path in (REPO_ROOT / "families").iterdir() if (path / "__init__.py").exists()}
    imports, reads = {}, {}
    for path in (REPO_ROOT / folder).rglob("*.py"):
        name = str(path.relative_to(REPO_ROOT))
        family_imports = sorted(m for m in _imported_modules(path) if any(f"families.{f}" in m for f in families))
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
    for folder in RUNTIME_FOLDERS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            tooling = sorted(m for m in _imported_modules(path) if m.split(".")[0] == "devtools" or ".devtools" in m)
            if tooling:
                offenders[str(path.relative_to(REPO_ROOT))] = tooling
    assert not offenders
    assert "devtools.host" in _imported_modules(REPO_ROOT / "devtools" / "demo.py")  # the guard resolves relative imports


def _runtime_modules() -> dict[str, Path]:
    modules = {}
    for folder in RUNTIME_FOLDERS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The pack modules `path` imports when it runs (type-only imports under `if TYPE_CHECKING:` left out)."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for node in ast.walk(block)}
    package = path.relative_to(REPO_ROOT).parent.parts
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in type_only or not node.level:
            continue
        base = package[: len(package) - node.level + 1]
        module = ".".join((*base, node.module)) if node.module else ".".join(base)
        for alias in node.names:
            name = f"{module}.{alias.name}"
            found.add(name if name in modules else module)
    return found & modules.keys()


def test_no_import_loop():
    """The runtime's modules import each other in one direction (type-only imports aside); a package's __init__ that
    only hands on its modules counts as its modules."""
    modules = _runtime_modules()
    graph = {name: _runtime_imports(path, modules) for name, path in modules.items()}
    loops, state = [], {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if imported.startswith(name + ".") or name.startswith(imported + ".") and modules[imported].name == "__init__.py":
                continue  # a package and its own modules
            if state.get(imported) == "open":
                loops.append(" -> ".join(trail[trail.index(imported):] + [imported]) if imported in trail else f"{name} -> {imported}")
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 80 and graph["core.executor"]  # the guard sees the house and resolves its imports
    assert not loops


def _function_lengths(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def test_runtime_files_and_functions_stay_small():
    """No runtime file over 400 lines, no function over 60 (a nested function counts inside its parent too)."""
    modules = _runtime_modules()
    long_files = {str(p.relative_to(REPO_ROOT)): n for p in modules.values() if (n := len(p.read_text().splitlines())) > 400}
    long_functions = {f"{p.relative_to(REPO_ROOT)}:{name}": n for p in modules.values()
                      for name, n in _function_lengths(p) if n > 60}
    assert not long_files
    assert not long_functions


PART_NAMES = {"width", "td_lora", "coarse", "tokens"}


def test_no_method_is_named_outside_its_folder_to_decide_what_runs():
    """The executor, the trainer, the nodes and the seam compose the registered methods; none asks `"width" in parts`
    or `part == "tokens"` (a method's own folder may)."""
    found = []
    for folder in RUNTIME_FOLDERS:
        if folder == "methods":
            continue
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn, ast.Eq, ast.NotEq)) for op in node.ops):
                    names = [side.value for side in (node.left, *node.comparators) if isinstance(side, ast.Constant)]
                    if PART_NAMES & set(names):
                        found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not found
    assert _guard_sees('"width" in spec.parts')  # the guard can see such a test


def _guard_sees(code: str) -> bool:
    return any(isinstance(node, ast.Compare) and PART_NAMES & {getattr(node.left, "value", None)} for node in ast.walk(ast.parse(code)))
