"""Checkpoints that prove they are whole, a locked output folder, and resumes that never run code from a file.

Every corruption of every file of a checkpoint (truncated, bit-flipped, swapped with the same file of
another checkpoint, missing, a foreign file, a tampered step) stops the resume with one line naming the
file, before any model is built; a pickle planted in each file in turn (also with the manifest rewritten
to vouch for it) never runs. Also: manifest and fsync before the rename, stale temporary folders removed,
each step logged once after a resume, the lock, and which config changes a resume accepts.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowbp_train import checkpoint as ckpt
from flowbp_train import rundir
from flowbp_train.config import ConfigError, from_dict
from flowbp_train.trainer import Trainer, train

from helpers import ROOT
from helpers.pipelines import PixelReward, tiny_adapter
from helpers.tolerance import TEST_THREADS


def config(out, **kw):
    values = dict(family="sd3", pretrained_model_name_or_path="tiny", method="flowbp-lagrange", num_steps=6,
                  resolution=16, train_batch_size=2, max_train_steps=2, learning_rate=1e-3, loss="neg",
                  mixed_precision="no", device="cpu", rank=4, output_dir=str(out), report_to="none",
                  num_sample_images=0, progress_bar=False, checkpointing_steps=2, use_ema=True,
                  prompts=["a cat", "a dog", "a red bus"])
    values.update(kw)
    return from_dict(values)


def run(out, **kw):
    return train(config(out, **kw), adapter=tiny_adapter("sd3"), reward=PixelReward())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs: LoRA + EMA (checkpoints 2 and 4) and full fine-tuning (checkpoint 2)."""
    root = tmp_path_factory.mktemp("ckpts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWBP_BACKEND", "torch")
        torch.set_num_threads(TEST_THREADS)
        lora = run(root / "lora", max_train_steps=4)
        full = run(root / "full", rank=0, use_ema=False, method="flowbp-sparse", method_options={"num_active": 2})
    return {"lora": (root / "lora", lora), "full": (root / "full", full)}


def no_model(monkeypatch):
    """Fail the test if a model is built (errors must come first)."""
    import flowbp_train.models as models

    def boom(*a, **k):
        raise AssertionError("a model was built before the error")

    monkeypatch.setattr(models, "build_adapter", boom)


def resume_error(out, folder, monkeypatch, **kw) -> str:
    """The one-line error of resuming ``folder`` (raised before any model is built)."""
    no_model(monkeypatch)
    cfg = config(out, resume_from_checkpoint=str(folder), max_train_steps=6, **kw)
    with pytest.raises((ckpt.CheckpointError, ConfigError)) as err:
        Trainer(cfg, reward=PixelReward())
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def copy_ckpt(src: Path, dst_root: Path) -> Path:
    dst = dst_root / src.name
    shutil.copytree(src, dst)
    return dst


def rehash(folder: Path, name: str) -> None:
    """Rewrite the manifest entry of ``name`` so that it vouches for the file as it is now (an attacker
    who also edits the manifest): the loaders themselves must then refuse the file."""
    man = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    man["files"][name] = ckpt.file_entries(folder, [name])[name]
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(man))


def files_of(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ manifest
def test_manifest_is_last_and_everything_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, events = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real_fsync(fd)

    def replace(a, b):
        events.append((str(a), str(b), len(synced)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    trainer = Trainer(config(tmp_path / "out"), adapter=tiny_adapter("sd3"), reward=PixelReward())
    trainer.training_step()
    final = trainer.save_checkpoint()
    trainer.close()
    man = json.loads((final / ckpt.MANIFEST_FILE).read_text())
    names = files_of(final)
    assert sorted(man["files"]) == [n for n in names if n != ckpt.MANIFEST_FILE]
    assert man["step"] == 1 and len(man["config_hash"]) == 64
    for n in man["files"]:
        assert man["files"][n] == ckpt.file_entries(final, [n])[n]
    (tmp, dst, n_synced), = [e for e in events if e[1] == str(final)]
    before = synced[:n_synced]
    for n in names:  # every file and the temporary folder itself, before the publishing rename
        assert str(Path(tmp) / n) in before, n
    assert tmp in before
    assert str(final.parent) in synced[n_synced:]  # then the parent folder, so the new name is durable


CORRUPTIONS = ["truncate", "flip", "swap", "missing"]


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_corrupted_file_stops_the_resume_naming_it(runs, tmp_path, monkeypatch, kind):
    src_root, _ = runs["lora"]
    names = files_of(src_root / "checkpoint-4")
    for name in names:
        folder = copy_ckpt(src_root / "checkpoint-4", tmp_path / f"{kind}-{name.replace('/', '_')}")
        path = folder / name
        data = path.read_bytes()
        if kind == "truncate":
            path.write_bytes(data[: len(data) // 2])
        elif kind == "flip":
            i = len(data) // 2
            path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
        elif kind == "swap":  # the same file of the step-2 checkpoint
            shutil.copy(src_root / "checkpoint-2" / name, path)
        else:
            path.unlink()
        msg = resume_error(tmp_path / "out", folder, monkeypatch)
        assert name in msg, (kind, name, msg)


def test_foreign_file_and_tampered_step_are_refused(runs, tmp_path, monkeypatch):
    src = runs["lora"][0] / "checkpoint-4"
    folder = copy_ckpt(src, tmp_path / "foreign")
    (folder / "evil.pt").write_bytes(b"x")
    assert "evil.pt" in resume_error(tmp_path / "o1", folder, monkeypatch)
    for rewrite_manifest in (False, True):  # global_step -5, with and without a manifest that vouches for it
        folder = copy_ckpt(src, tmp_path / f"step-{rewrite_manifest}")
        state = json.loads((folder / ckpt.STATE_FILE).read_text())
        state["global_step"] = -5
        (folder / ckpt.STATE_FILE).write_text(json.dumps(state))
        if rewrite_manifest:
            rehash(folder, ckpt.STATE_FILE)
        msg = resume_error(tmp_path / "o2", folder, monkeypatch)
        assert ckpt.STATE_FILE in msg, msg
    folder = copy_ckpt(src, tmp_path / "manifest-step")
    man = json.loads((folder / ckpt.MANIFEST_FILE).read_text())
    man["step"] = -5
    (folder / ckpt.MANIFEST_FILE).write_text(json.dumps(man))
    assert ckpt.MANIFEST_FILE in resume_error(tmp_path / "o3", folder, monkeypatch)


def test_latest_never_takes_an_unfinished_folder(runs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(runs["lora"][0] / "checkpoint-2", out / "checkpoint-2")
    shutil.copytree(runs["lora"][0] / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / ckpt.MANIFEST_FILE).unlink()  # killed before the manifest (cannot happen after the
    assert ckpt.resolve_checkpoint(out, "latest") == out / "checkpoint-2"  # rename, but a copy can lose it)


# ------------------------------------------------------------------------------------------ pickles
class _Plant:
    """A pickle that, when unpickled, writes a marker file and returns ``value`` (a "stealth" payload)."""

    def __init__(self, marker: Path, value=None):
        self.marker, self.value = str(marker), value

    def __reduce__(self):
        code = f"(open({self.marker!r}, 'w').write('ran'), {self.value!r})[1]"
        return eval, (code,)


def plants(marker: Path) -> dict[str, callable]:
    """Ways to put a pickle in a file: torch.save of a payload (zip format) and a raw pickle stream."""
    return {"torch.save": lambda p: torch.save({"state": _Plant(marker, 1)}, p),
            "pickle": lambda p: p.write_bytes(pickle.dumps(_Plant(marker, {"python": 1}), protocol=2))}


@pytest.mark.parametrize("which", ["lora", "full"])
def test_a_planted_pickle_never_runs(runs, tmp_path, monkeypatch, which):
    src = runs[which][0] / "checkpoint-2"
    marker = tmp_path / "ran.txt"
    count = 0
    for name in files_of(src):
        for how, plant in plants(marker).items():
            for vouched in (False, True) if name != ckpt.MANIFEST_FILE else (False,):
                folder = copy_ckpt(src, tmp_path / f"{how}-{vouched}-{name.replace('/', '_')}")
                plant(folder / name)
                if vouched:
                    rehash(folder, name)
                    monkeypatch.undo()  # the loaders run: the model is built this time
                    cfg = config(tmp_path / "o", resume_from_checkpoint=str(folder), max_train_steps=3,
                                 **({"rank": 0, "use_ema": False, "method": "flowbp-sparse",
                                     "method_options": {"num_active": 2}} if which == "full" else {}))
                    with pytest.raises(ckpt.CheckpointError) as err:
                        Trainer(cfg, adapter=tiny_adapter("sd3"), reward=PixelReward()).train()
                    msg = str(err.value)
                else:
                    msg = resume_error(tmp_path / "o", folder, monkeypatch, **(
                        {"rank": 0, "use_ema": False, "method": "flowbp-sparse",
                         "method_options": {"num_active": 2}} if which == "full" else {}))
                assert "\n" not in msg and name in msg, (name, how, vouched, msg)
                assert not marker.exists(), f"the pickle planted in {name} ({how}) ran"
                count += 1
    assert count >= 4 * len(files_of(src)) - 2  # every file, both plants, with and without a vouching manifest
    print(f"\nplanted pickles ({which}): {count} files tried, 0 executed")


# ------------------------------------------------------------------------------------------ run folder
def test_stale_temporaries_are_removed_on_start(tmp_path):
    out = tmp_path / "out"
    (out / ".tmp-checkpoint-7-123" / "x").mkdir(parents=True)
    (out / ".old-checkpoint-3-9").mkdir()
    t = Trainer(config(out), adapter=tiny_adapter("sd3"), reward=PixelReward())
    assert not (out / ".tmp-checkpoint-7-123").exists() and not (out / ".old-checkpoint-3-9").exists()
    t.close()


def test_a_redone_step_is_logged_once(tmp_path):
    full = run(tmp_path / "a", max_train_steps=4)
    out = tmp_path / "b"
    run(out, max_train_steps=4)
    shutil.rmtree(out / "checkpoint-4")  # the run "died" after logging steps 3 and 4, before checkpoint 4
    resumed = run(out, max_train_steps=4, resume_from_checkpoint="latest")
    lines = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    # bit-exact: the same operations in the same order in this process; the checkpoint restores by copy
    assert [r["loss"] for r in lines] == full.losses and resumed.losses == full.losses[2:]


def test_a_busy_output_dir_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = rundir.OutputDirLock(out).acquire()
    try:
        recipe = ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "flowbp_train.cli", str(recipe), f"output_dir={out}",
                               "max_train_steps=1", "progress_bar=false"], env=env, capture_output=True,
                              text=True, timeout=120)
        err = proc.stderr.strip()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "\n" not in err and f"pid {os.getpid()}" in err and socket.gethostname() in err, err
        assert not (out / "checkpoint-1").exists() and not (out / "config.yaml").exists()
    finally:
        holder.release()
    assert not (out / rundir.LOCK_FILE).exists()


def test_stale_and_foreign_locks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = out / rundir.LOCK_FILE
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"}))
    t = Trainer(config(out), adapter=tiny_adapter("sd3"), reward=PixelReward())  # a dead pid's lock: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    t.close()
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "started": "now"}))
    with pytest.raises(rundir.OutputDirBusy, match="pid 1 on host another-machine"):
        Trainer(config(out), adapter=tiny_adapter("sd3"), reward=PixelReward())
    assert json.loads(lock.read_text())["host"] == "another-machine"  # a foreign lock is never removed


# ------------------------------------------------------------------------------------------ config changes
def test_resume_refuses_changed_method_unless_allowed(runs, tmp_path, monkeypatch):
    folder = runs["lora"][0] / "checkpoint-2"
    msg = resume_error(tmp_path / "o", folder, monkeypatch, method="refl", method_options={"last_n": 3})
    assert msg.startswith("method:") and "resume_allow_changes" in msg
    msg = resume_error(tmp_path / "o", folder, monkeypatch, rank=8, lora_target_modules=["to_q"])
    assert msg.startswith("rank:") and "lora_target_modules" in msg
    monkeypatch.undo()
    t = Trainer(config(tmp_path / "o2", resume_from_checkpoint=str(folder), method="refl",
                       method_options={"last_n": 3}, resume_allow_changes=True, max_train_steps=3),
                adapter=tiny_adapter("sd3"), reward=PixelReward())
    with pytest.warns(UserWarning, match="method: 'flowbp-lagrange' -> 'refl'"):
        res = t.train()
    assert [r["step"] for r in res.records] == [3]


def test_a_new_learning_rate_applies_on_resume(runs, tmp_path):
    folder = runs["lora"][0] / "checkpoint-2"
    out = tmp_path / "o"
    t = Trainer(config(out, resume_from_checkpoint=str(folder), learning_rate=3e-4, adam_beta2=0.99,
                       ema_decay=0.9, max_train_steps=3), adapter=tiny_adapter("sd3"), reward=PixelReward())
    with pytest.warns(UserWarning, match="learning_rate: 0.001 -> 0.0003"):
        res = t.train()
    assert res.records[0]["lr"] == 3e-4  # constant_with_warmup, no warmup: the new rate itself
    assert all(g["lr"] == 3e-4 and g["betas"] == (0.9, 0.99) for g in t.optimizer.param_groups)
    assert t.ema.decay == 0.9
    events = [json.loads(x) for x in (out / "logs" / "resume_log.jsonl").read_text().splitlines()]
    assert events[-1]["step"] == 2 and events[-1]["changed"]["learning_rate"] == [1e-3, 3e-4]


def test_no_loader_in_the_code_unpickles():
    """Every torch.load of the library passes weights_only=True; nothing calls pickle, dill or joblib to
    load, nor numpy with allow_pickle (a static check of the sources, so a new loader cannot slip in)."""
    import re

    bad = []
    for path in [*(ROOT / "python" / "flowbp_train").rglob("*.py"), *(ROOT / "flowbp_kernels").rglob("*.py")]:
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[m.end(): end]
            if "weights_only=True" not in call:
                bad.append(f"{path.relative_to(ROOT)}: torch.load({call.strip()[:60]}")
        for pattern in (r"pickle\.loads?\(", r"\bdill\.", r"joblib\.load", r"allow_pickle\s*=\s*True",
                        r"weights_only\s*=\s*False", r"Unpickler\("):
            bad += [f"{path.relative_to(ROOT)}: {pattern}" for _ in re.finditer(pattern, text)]
    assert not bad, bad
