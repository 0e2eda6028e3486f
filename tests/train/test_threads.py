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
from flowbp_train import threads as policy_module
from flowbp_train.threads import announce, policy_for_train
with_torch = sys.argv[1] == "torch"
threads_module_governed = lambda: policy_module._governor is not None
policy_for_train("flowbp-train", sys.argv[2], sys.argv[3:])
before = "torch" in sys.modules
threads = None
if with_torch:
    import torch
    threads = torch.get_num_threads()
announce()
print(json.dumps({"torch_before": before, "threads": threads, "governed": threads_module_governed(),
                  "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
                  "spin": os.environ.get("GOMP_SPINCOUNT")}))
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


def test_cpu_run_gets_idle_cores_a_short_spin_and_a_governor_before_torch():
    out, err = _probe(MINI, torch=True)
    assert not out["torch_before"]  # reading the recipe did not import torch
    n = int(out["env"]["OMP_NUM_THREADS"])
    assert 1 <= n <= T.available_cores() and out["threads"] == n  # torch took the count it found set
    # flowbp-train chose the count: a short spin, and the governor its loop consults (rebalance)
    assert out["env"]["OMP_WAIT_POLICY"] is None and out["spin"] == str(T.SPIN_COUNT) and out["governed"]
    line = [ln for ln in err.splitlines() if "CPU threads" in ln]
    assert len(line) == 1 and line[0].startswith("flowbp-train: CPU threads: ") and "GOMP_SPINCOUNT" in line[0]


def test_user_settings_are_kept():
    out, err = _probe(MINI, torch=True, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE")
    assert out["env"] == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE", "MKL_NUM_THREADS": None}
    assert out["threads"] == 1 and "OMP_NUM_THREADS=1 (yours)" in err and "OMP_WAIT_POLICY=ACTIVE (yours)" in err
    out, _ = _probe(MINI, MKL_NUM_THREADS="1")  # a count through MKL's variable is the user's too:
    # then the passive policy (a count of the user's is never changed, so it must never spin)
    assert out["env"]["OMP_NUM_THREADS"] is None and out["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert out["spin"] is None and not out["governed"]
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


class _Load:
    """A fake clock, /proc/stat and own CPU time for the governor: ``advance(seconds, ours, others)``
    lets ``seconds`` pass with this process busy on ``ours`` cores and other work on ``others``."""

    HZ = 100.0

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0.0, 0.0

    def advance(self, seconds, ours, others):
        self.t += seconds
        self.busy += (ours + others) * seconds * self.HZ
        self.own += ours * seconds

    def governor(self, cores=2, threads=2):
        g = T.Governor(cores, threads, clock=lambda: self.t, cpu_times=lambda: (self.busy, 0.0),
                       own_time=lambda: self.own)
        g.hz = self.HZ
        return g


def test_governor_follows_the_load(monkeypatch):
    import torch

    set_to = []
    monkeypatch.setattr(torch, "set_num_threads", set_to.append)  # this test process keeps its threads
    load = _Load()
    g = load.governor()
    load.advance(1.0, 2.0, 0.0)
    assert g.step() is None  # before CHECK_SECONDS: not even looked at
    for _ in range(3):  # quiet: both cores stay ours
        load.advance(T.CHECK_SECONDS, 2.0, 0.0)
        assert g.step() is None and g.threads == 2
    load.advance(T.CHECK_SECONDS, 1.0, 1.0)  # a process starts and takes a core
    assert g.step() is None  # one check is not enough
    load.advance(T.CHECK_SECONDS, 1.0, 1.0)
    assert g.step() == 1 and g.threads == 1 and set_to == [1]
    assert g.changes[-1][:2] == (2, 1) and abs(g.changes[-1][2] - 1.0) < 1e-9
    load.advance(T.CHECK_SECONDS, 1.0, 0.0)  # it ends: after two quiet checks, both cores again
    assert g.step() is None
    load.advance(T.CHECK_SECONDS, 1.0, 0.0)
    assert g.step() == 2 and set_to == [1, 2]
    load.advance(T.CHECK_SECONDS, 2.0, 1.0)  # a burst of one interval does not move it
    assert g.step() is None
    load.advance(T.CHECK_SECONDS, 2.0, 0.0)
    assert g.step() is None and g.threads == 2 and set_to == [1, 2]


def test_governor_without_proc_stat_changes_nothing(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: pytest.fail("changed the threads"))
    clock = [0.0]
    g = T.Governor(2, 2, clock=lambda: clock[0], cpu_times=lambda: None, own_time=lambda: 0.0)
    for _ in range(3):
        clock[0] += 10.0
        assert g.step() is None and g.threads == 2
    assert T._governor is None and T.rebalance() is None  # no governor in a test process: a no-op


def test_governed_policy_in_process():
    env = {}
    policy = T.apply_cpu_policy("x", environ=env, log=False, governed=True, sample_seconds=0.01)
    if policy.busy is None:  # no /proc/stat: the count is chosen blind, no governor, the passive policy
        assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    else:
        assert env == {"OMP_NUM_THREADS": str(policy.threads), "GOMP_SPINCOUNT": str(T.SPIN_COUNT)}
    env = {"OMP_NUM_THREADS": "2"}  # the user's count: passive, never governed
    T.apply_cpu_policy("x", environ=env, log=False, governed=True)
    assert env == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    T.apply_cpu_policy("x", environ=env, log=False, governed=True, processes=2, sample_seconds=0.01)
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE"  # ranks share the cores: each keeps its share, passive
