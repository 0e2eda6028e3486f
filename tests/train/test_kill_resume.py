"""SIGKILL at random moments of checkpoint writes, then resume: the result equals an uninterrupted run.

The CPU miniature (family ``mini``, LoRA + EMA, a checkpoint after every step) runs in child processes
forked from one forkserver. Each trial kills a run while it writes a randomly chosen checkpoint, after a
random fraction of that write's measured duration, checks that every complete checkpoint left on disk
verifies, then resumes from ``latest`` to the end. The losses of the resumed run's log must equal the
uninterrupted run's exactly (bit-exact: every run does the same operations in the same order in the same
process settings, one build and one thread count, and the checkpoint restores every tensor and random
stream by copy), with each step logged once.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import time
from pathlib import Path

import pytest

from flowbp_train import checkpoint as ckpt
from flowbp_train.rundir import LOCK_FILE

from helpers import ROOT

RECIPE = str(ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml")
STEPS = 5
OVERRIDES = [f"max_train_steps={STEPS}", "checkpointing_steps=1", "num_steps=4", "train_batch_size=2", "rank=2",
             "lora_alpha=2", "use_ema=true", "report_to=none", "progress_bar=false", "num_sample_images=0"]
#: At least 10 trials (the issue's bar); each costs about a second.
TRIALS = 12
#: Fixed, so that a failure can be replayed; every trial draws its own checkpoint and moment from it.
SEED = 20260611
CHILD_TIMEOUT_S = 120
#: One thread per child whatever the suite's setting: 25 short processes on a shared 2-core machine would
#: oversubscribe it at 2; exactness only needs the reference, killed and resumed runs to share the setting.
CHILD_THREADS = 1
#: Everything a miniature run imports, imported once by the forkserver (imports run no torch op, so the
#: children fork before any thread pool exists).
PRELOAD = ["torch", "diffusers", "peft", "flowbp_train.trainer", "flowbp_train.models.mini",
           "flowbp_train.rewards.mini", "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
           "diffusers.loaders.lora_pipeline", "diffusers.optimization", "peft.tuners.lora", "safetensors.torch",
           "sklearn.svm", "scipy.stats", "helpers.kill_child"]


@pytest.fixture(scope="module")
def ctx():
    pytest.importorskip("sklearn")
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(PRELOAD)
    return c


def start(ctx, out: Path, extra: list[str] = ()):
    from helpers import kill_child

    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=kill_child.run, args=(RECIPE, [*OVERRIDES, f"output_dir={out}", *extra], send,
                                                  CHILD_THREADS))
    p.start()
    send.close()
    return p, recv


def finish(p, recv) -> list[tuple]:
    msgs = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        if recv.poll(0.2):
            try:
                msgs.append(recv.recv())
            except EOFError:
                break
            if msgs[-1][0] == "done":
                break
        elif not p.is_alive():
            break
    p.join(CHILD_TIMEOUT_S)
    assert p.exitcode == 0, f"child failed with exit code {p.exitcode}: {msgs}"
    return msgs


def losses(out: Path) -> list[tuple[int, float]]:
    lines = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_sigkill_during_checkpoint_writes_then_resume_is_exact(ctx, tmp_path):
    ref_out = tmp_path / "reference"
    msgs = finish(*start(ctx, ref_out))
    durations = [m[2] for m in msgs if m[0] == "end"]
    assert len(durations) == STEPS
    reference = losses(ref_out)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))
    write_s = statistics.median(durations)
    rng = random.Random(SEED)
    inside = exact = 0
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        target, fraction = rng.randint(1, STEPS - 1), rng.random()
        p, recv = start(ctx, out)
        killed_in_write = None
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        while time.monotonic() < deadline:
            if recv.poll(0.5):
                msg = recv.recv()
                if msg == ("begin", target):
                    time.sleep(fraction * write_s)
                    os.kill(p.pid, signal.SIGKILL)
                    killed_in_write = True
                    break
            assert p.is_alive(), "the child ended before the chosen checkpoint"
        p.join(CHILD_TIMEOUT_S)
        assert p.exitcode == -signal.SIGKILL
        while recv.poll(0):  # an "end" already sent means the kill came just after that write
            try:
                if recv.recv()[:2] == ("end", target):
                    killed_in_write = False
            except EOFError:
                break
        inside += bool(killed_in_write)
        for folder in ckpt.list_checkpoints(out):  # whatever survived is whole
            ckpt.verify_checkpoint(folder)
        assert (out / LOCK_FILE).is_file()  # the dead run's lock: the resume must take it over
        finish(*start(ctx, out, ["resume_from_checkpoint=latest"]))
        assert not list(out.glob(".tmp-checkpoint-*")) and not (out / LOCK_FILE).exists()
        got = losses(out)
        assert [s for s, _ in got] == list(range(1, STEPS + 1)), got  # each step logged once
        assert got == reference, (trial, target, fraction)  # bit-exact, see the module docstring
        exact += 1
    print(f"\nkill trials: {TRIALS}, killed inside a write: {inside}, exact resumes: {exact} "
          f"(median write {write_s * 1e3:.1f} ms)")
    assert exact == TRIALS
    assert inside >= TRIALS // 2  # most kills must land inside a write, or the test tests little
