"""The test suite's one policy for the interpreter, the kernel backend and threads (fixtures live beside
the tests that use them; helpers are the ``helpers`` package, see tests/helpers/__init__.py).

- Triton kernels are tested on the CPU in the interpreter: ``TRITON_INTERPRET=1`` when no GPU is
  visible, set here, before the first test module (hence any kernel module: ``triton.jit`` reads it when
  it decorates) is imported.
- Threads: every test runs at ``helpers.tolerance.TEST_THREADS`` (``OMP_NUM_THREADS`` when set, else 1),
  applied before each test, after collection, so modules that set their own count at import do not decide
  it; the processes tests start inherit ``OMP_*`` from the environment.
- Backend: the trainer's unit tests (``tests/train/``, but for the end-to-end suites ``mini/``,
  ``distributed/`` and ``userpath/``, which run the trainer as a user does) use the torch reference ops and
  no JIT build (``FLOWBP_BACKEND=torch``, ``FLOWBP_JIT=0``): the trainer is under test there, the kernels
  are tested on every backend in ``tests/kernels/``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers.tolerance import TEST_THREADS  # noqa: E402

TESTS = Path(__file__).resolve().parent
#: suites under tests/train that run the trainer end to end, with the kernel dispatch a user gets
END_TO_END = ("mini", "distributed", "userpath")


def _reference_ops(path: Path) -> bool:
    try:
        parts = Path(path).resolve().relative_to(TESTS / "train").parts
    except ValueError:
        return False
    return len(parts) == 1 or parts[0] not in END_TO_END


@pytest.fixture(autouse=True)
def _policy(request, monkeypatch):
    torch.set_num_threads(TEST_THREADS)
    if _reference_ops(request.node.path):
        monkeypatch.setenv("FLOWBP_BACKEND", "torch")
        monkeypatch.setenv("FLOWBP_JIT", "0")
