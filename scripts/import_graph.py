"""The import graph of the repository's own modules, read with ``ast`` (nothing is imported).

Every ``import`` counts, also those inside functions (a lazy import still ties two modules together).
Nodes are modules: ``flowbp_kernels.*``, ``flowbp_train.*`` and the files under ``tests/``, ``benchmarks/``
and ``scripts/`` (named by path). ``from pkg import name`` points at ``pkg.name`` when that is a module of
ours, else at ``pkg`` (its ``__init__``). Prints the arrows between packages, every import circle, and the
layering rules the trainer keeps (no circle; nothing under ``models/`` or ``rewards/`` imports the
miniature ``mini/``; ``flowbp_kernels`` never imports ``flowbp_train``); exit status 1 when one is broken.
``python scripts/import_graph.py [--edges]``; the test ``tests/train/test_layering.py`` calls :func:`check`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: where the packages live (module name = path below the root, dots for slashes)
PACKAGE_ROOTS = (ROOT, ROOT / "python")
PACKAGES = ("flowbp_kernels", "flowbp_train")
#: loose script folders: each file is a node named by its path ("tests/helpers/pipelines")
SCRIPT_DIRS = ("tests", "benchmarks", "scripts")


def _module_files() -> dict[str, Path]:
    mods: dict[str, Path] = {}
    for base in PACKAGE_ROOTS:
        for pkg in PACKAGES:
            for f in sorted((base / pkg).rglob("*.py")) if (base / pkg).is_dir() else ():
                parts = list(f.relative_to(base).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts.pop()
                mods[".".join(parts)] = f
    for d in SCRIPT_DIRS:
        for f in sorted((ROOT / d).rglob("*.py")):
            rel = f.relative_to(ROOT).with_suffix("")
            mods["/".join(rel.parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is one of our modules."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def _script_targets(node_name: str, f: Path, imported: str, mods: dict[str, Path]) -> str | None:
    """A test or benchmark helper imported by a bare name (``import tiny``, ``from _common import x``)."""
    folder = "/".join(node_name.split("/")[:-1])
    for base in (folder, *(folder.rsplit("/", k)[0] for k in range(1, folder.count("/") + 1)), "tests"):
        cand = f"{base}/{imported.replace('.', '/')}" if base else imported
        if cand in mods:
            return cand
        if f"{cand}/__init__" in mods:
            return f"{cand}/__init__"
    return None


def graph() -> dict[str, set[str]]:
    """``module -> modules it imports`` (ours only)."""
    mods = _module_files()
    edges: dict[str, set[str]] = defaultdict(set)
    for name, f in mods.items():
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level and "/" not in name:  # relative import inside a package
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                elif node.level:  # relative import between test helpers
                    mod = node.module or ""
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            for t in targets:
                hit = _resolve(t, mods) if t.split(".")[0] in PACKAGES else None
                if hit is None and "/" in name and t:
                    hit = _script_targets(name, f, t, mods)
                if hit is not None and hit != name:
                    edges[name].add(hit)
    return dict(edges)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def _group(mod: str) -> str:
    """The package a module belongs to, for the summary (``flowbp_train.models``, ``tests/train``)."""
    if "/" in mod:
        return "/".join(mod.split("/")[:2]) if mod.count("/") >= 2 else mod.split("/")[0]
    parts = mod.split(".")
    if parts[0] == "flowbp_train" and len(parts) > 2:
        return ".".join(parts[:2])
    if parts[0] == "flowbp_train":
        return "flowbp_train" if len(parts) == 1 else "flowbp_train (top)"
    return "flowbp_kernels"


def forbidden(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Arrows the layering forbids: ``models``/``rewards`` -> ``mini``; ``flowbp_kernels`` -> ``flowbp_train``."""
    bad = []
    for a, bs in sorted(edges.items()):
        for b in sorted(bs):
            if a.startswith(("flowbp_train.models", "flowbp_train.rewards")) and b.startswith("flowbp_train.mini"):
                bad.append((a, b))
            if a.startswith("flowbp_kernels") and b.startswith("flowbp_train"):
                bad.append((a, b))
    return bad


def check() -> list[str]:
    """Every broken rule as one line (empty: the layering holds)."""
    edges = graph()
    problems = [f"import circle: {' <-> '.join(c)}" for c in cycles(edges)]
    problems += [f"forbidden import: {a} -> {b}" for a, b in forbidden(edges)]
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edges", action="store_true", help="also print every module-level arrow")
    a = ap.parse_args(argv)
    edges = graph()
    groups: dict[tuple[str, str], int] = defaultdict(int)
    for src, dsts in edges.items():
        for d in dsts:
            if _group(src) != _group(d):
                groups[(_group(src), _group(d))] += 1
    print("arrows between packages (count of module imports):")
    for (s, d), n in sorted(groups.items()):
        print(f"  {s:28s} -> {d:28s} {n}")
    if a.edges:
        print("module imports:")
        for s in sorted(edges):
            print(f"  {s} -> {', '.join(sorted(edges[s]))}")
    cyc = cycles(edges)
    print(f"import circles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(c))
    bad = forbidden(edges)
    print(f"forbidden arrows (models/rewards -> mini, kernels -> train): {len(bad)}")
    for s, d in bad:
        print(f"  {s} -> {d}")
    return 1 if cyc or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
