"""Ahead-of-time compilation of the Triton kernels for sm_90 (no GPU needed): ``pytest -k aot``.

What the interpreter cannot see: every specialization the launchers produce for the test and benchmark
shapes must compile for ``GPUTarget("cuda", 90, 32)`` without a ptxas spill, without an fp32 FMA (the
kernels round as the reference does) and with correctly rounded fp8 divisions. The work runs in
triton_aot.py beside this file, in a fresh process without TRITON_INTERPRET (this one's kernels are interpreted).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "triton_aot.py"
#: A generous ceiling for the subprocess (about 1.5 minutes on 2 busy cores for ~270 specializations).
TIMEOUT_S = 1200


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_aot_every_specialization_compiles_for_sm90_without_spills_or_fma():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FLOWBP_BACKEND")}
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no summary (rc {r.returncode}): {r.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    if "skipped" in summary:
        pytest.skip(f"triton {summary['triton']}: {summary['skipped']}")
    assert summary["specializations"] > 0 and summary["launches"] >= summary["specializations"], summary
    for kernel, count in summary["by_kernel"].items():
        assert count > 0, f"no launch of {kernel} was recorded: {summary}"
    assert not summary["failures"], summary["failures"][:5]
    assert summary["compiled"] == summary["specializations"], summary
    assert not summary["spills"], f"ptxas spilled: {summary['spills'][:5]}"
    assert not summary["fp32_fma"], f"fp32 FMA contraction (enable_fp_fusion not off): {summary['fp32_fma'][:5]}"
    assert not summary["approx_division"], f"fp8 division not correctly rounded: {summary['approx_division'][:5]}"
    assert r.returncode == 0, r.stderr[-3000:]
