"""The test suite's helpers: one package, imported one way (``from helpers.tolerance import ...``).

``tests/`` is on the import path of every test (``pythonpath`` in pyproject's pytest settings) and of
every process a test starts (:func:`subprocess_env`); no test module imports another or edits
``sys.path`` for a helper (the script run by hand, ``kernels/ops/triton_aot.py``, names the folder once).
Modules: ``tolerance`` (the tolerance policy, stated once), ``engine`` (a tiny float64 velocity model
and reward for the engine tests), ``kernels`` (the kernel tests' grids and error bounds), ``pipelines``
(tiny random pipelines of the three families, their adapters, tiny rewards), ``reward_models`` (tiny
CLIP / open_clip / BLIP stand-ins), ``images`` (synthetic test images), ``folders`` (tiny complete
diffusers folders with real tokenizers, for the user-path tests), ``recorded_sample`` and ``recipes``
(recorded references and the scripts that record them), ``kill_child`` (the training process the
kill-resume test SIGKILLs).
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root and the test folder (what ``pythonpath`` puts on the path).
ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's, ``tests/`` first on ``PYTHONPATH`` (so the
    child imports ``helpers`` as the tests do), and ``extra`` on top."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), path) if p), **extra}
