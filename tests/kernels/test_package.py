"""The engine package's names: every module path gives a module, the public functions keep their names, and
no module imports one that imports it back (read from the sources, function-level imports included)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import flowbp_kernels as fb
import flowbp_kernels.ops as ops

PKG = Path(fb.__file__).resolve().parent


def _modules() -> list[str]:
    # _C is the compiled op library (torch.ops.flowbp), not a Python module
    return [m.name for m in pkgutil.walk_packages(fb.__path__, "flowbp_kernels.") if not m.name.endswith("._C")]


def test_every_module_path_is_a_module():
    for name in _modules():
        importlib.import_module(name)
        parent, _, leaf = name.rpartition(".")
        assert isinstance(getattr(importlib.import_module(parent), leaf), types.ModuleType), name


def test_public_names_are_the_functions():
    for name in fb.__all__:
        assert not isinstance(getattr(fb, name), types.ModuleType), name
    for name in ops.__all__:
        assert getattr(ops, name) is getattr(fb, name, getattr(ops, name))
        assert not isinstance(getattr(ops, name), types.ModuleType), name
    assert fb.lagrange_leap is ops.lagrange_leap and callable(fb.rollout)


def test_no_import_circle():
    names = set(_modules()) | {"flowbp_kernels"}
    edges: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        edges[mod] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from pkg import sub` depends on the submodule; `from mod import name` on the module
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [s for s in subs if s in names] or [node.module]
            else:
                continue
            edges[mod] |= {t for t in targets if t in names and t != mod}
    assert not any(node.level for path in PKG.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.ImportFrom)), "relative imports: this check reads absolute ones"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(edges.get(mod, ())):
            assert state.get(dep) != 1, "import circle: " + " -> ".join([*path, mod, dep])
            if dep not in state:
                visit(dep, [*path, mod])
        state[mod] = 2

    for mod in sorted(edges):
        if mod not in state:
            visit(mod, [])
