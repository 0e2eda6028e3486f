"""The import graph of the whole repository (scripts/import_graph.py, read with ``ast``, every import
counted, also those inside functions): no import circle, nothing under ``models/`` or ``rewards/``
imports the miniature's tools (``flowbp_train.mini``), and the engine never imports the trainer."""

from __future__ import annotations

import subprocess
import sys

from helpers import ROOT


def test_no_import_circle_and_no_arrow_into_the_miniature():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "import circles: 0" in proc.stdout and "forbidden arrows (models/rewards -> mini, kernels -> train): 0" \
        in proc.stdout, proc.stdout[-3000:]
    # the graph sees the layers it checks: the adapters and rewards import the neutral module, the tools them
    arrows = proc.stdout
    assert "flowbp_train.models" in arrows and "flowbp_train.mini" in arrows


def test_the_checker_finds_a_circle_and_a_forbidden_arrow():
    """The checker itself, on small hand-made graphs (its functions, loaded from the script's file)."""
    code = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('ig', {str(ROOT / 'scripts' / 'import_graph.py')!r})\n"
            "ig = importlib.util.module_from_spec(spec); spec.loader.exec_module(ig)\n"
            "print(ig.cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}))\n"
            "print(ig.forbidden({'flowbp_train.models.x': {'flowbp_train.mini.y', 'flowbp_train.digits'},\n"
            "                    'flowbp_kernels.z': {'flowbp_train'}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cyc, bad = proc.stdout.splitlines()
    assert cyc == "[['a', 'b', 'c']]"
    assert bad == "[('flowbp_kernels.z', 'flowbp_train'), ('flowbp_train.models.x', 'flowbp_train.mini.y')]"
