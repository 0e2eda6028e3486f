"""The CPU thread policy of the entry points (``flowbp_train.threads``), in fresh processes: set before
torch starts (torch then runs with it), the user's own OMP_* / MKL_* settings and ``--threads`` kept,
said in one line once the arguments hold, nothing for a GPU run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowbp_train import threads as T

from helpers import ROOT

MINI = str(ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml")
FLUX = str(ROOT / "recipes" / "flux1" / "flowbp-lagrange.yaml")
PROBE = """
import json, os, sys
from flowbp_train.threads import announce, policy_for_train
with_torch = sys.argv[1] == "torch"
policy_for_train("flowbp-train", sys.argv[2], sys.argv[3:])
before = "torch" in sys.modules
threads = None
if with_torch:
    import torch
    threads = torch.get_num_threads()
announce()
print(json.dumps({"torch_before": before, "threads": threads,
                  "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}}))
"""


def _env(**set_vars) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (*T.COUNT_VARS, *T.WAIT_VARS, T.SWITCH_VAR)}
    env.update(set_vars)
    return env


def _probe(*args, torch: bool = False, **set_vars):
    """Run the policy in a fresh process (importing torch after it when ``torch``)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, "torch" if torch else "-", *args], env=_env(**set_vars),
                          capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_cpu_run_gets_idle_cores_and_passive_wait_before_torch():
    out, err = _probe(MINI, torch=True)
    assert not out["torch_before"]  # reading the recipe did not import torch
    n = int(out["env"]["OMP_NUM_THREADS"])
    assert 1 <= n <= T.available_cores() and out["threads"] == n  # torch took the count it found set
    assert out["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    line = [ln for ln in err.splitlines() if "CPU threads" in ln]
    assert len(line) == 1 and line[0].startswith("flowbp-train: CPU threads: ") and "PASSIVE" in line[0]


def test_user_settings_are_kept():
    out, err = _probe(MINI, torch=True, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert out["env"] == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": None}
    assert out["threads"] == 1 and "OMP_NUM_THREADS=1 (yours)" in err and "OMP_WAIT_POLICY=ACTIVE (yours)" in err
    out, _ = _probe(MINI, MKL_NUM_THREADS="1")  # a count through MKL's variable is the user's too
    assert out["env"]["OMP_NUM_THREADS"] is None and out["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    out, err = _probe(MINI, FLOWBP_THREAD_POLICY="off")
    assert out["env"] == {"OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None, "MKL_NUM_THREADS": None}
    assert "FLOWBP_THREAD_POLICY=off" in err


def test_gpu_run_is_left_alone():
    out, err = _probe(FLUX, "device=cuda")
    assert out["env"]["OMP_NUM_THREADS"] is None and out["env"]["OMP_WAIT_POLICY"] is None and not err.strip()


def test_real_command_says_it_once(tmp_path):
    # flowbp-mini with --threads: the user's count, said once (that a bad argument stays a one-line error
    # with the policy on is test_hostile_inputs.py's test_real_commands_as_subprocesses)
    proc = subprocess.run([sys.executable, "-c", "import sys; from flowbp_train.cli import mini_main; "
                           "sys.exit(mini_main())", "check", "--per-prompt", "2", "--steps", "2", "--threads", "1"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "CPU threads" in ln]
    assert lines == [lines[0]] and "1 (as asked)" in lines[0] and "PASSIVE" in lines[0]


def test_choices_in_process():
    assert T.choose_threads(2, 0.05) == 2 and T.choose_threads(2, 1.0) == 1 and T.choose_threads(2, 2.0) == 1
    assert T.choose_threads(8, 1.2) == 7 and T.choose_threads(8, None) == 8 and T.choose_threads(8, 0.0, 4) == 2
    env = {}
    policy, workers = T.worker_policy("x", 3, environ=env, log=False)
    assert workers == 3 and env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"} and policy.threads == 1
    env = {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "0"}
    policy, workers = T.worker_policy("x", 1, environ=env, log=False)
    assert env == {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "0"} and policy.threads == 2
    env = {}
    policy = T.apply_cpu_policy("x", threads=3, environ=env, log=False)
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE"} and policy.threads == 3
    assert T.gpu_visible({"CUDA_VISIBLE_DEVICES": ""}) is False
    assert T._argv_threads(["check", "--threads", "4"]) == 4 and T._argv_threads(["--threads=x"]) is None


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="busy cores are read from /proc/stat (Linux)")
def test_busy_cores_is_a_count_of_this_process_cores():
    busy = T.busy_cores(0.05)
    assert busy is not None and 0.0 <= busy <= T.available_cores()
