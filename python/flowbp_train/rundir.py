"""The output folder of one run: a lock against a second run, and what a resume may change.

:class:`OutputDirLock` is a file ``output_dir/.flowbp.lock`` created with O_EXCL and holding the pid,
host and start time of its owner: a second run into the folder fails at once naming the holder; a lock
whose process is gone (same host, pid not alive or reused) is taken over. :func:`resume_changes` compares
the config saved in a checkpoint with the new one: keys of ``config.RESUME_FIXED_KEYS`` must not change
(unless ``resume_allow_changes``), the others are applied by :func:`apply_resumed_settings`, which makes
a new learning rate, betas, epsilon, weight decay or EMA decay win over the values the checkpoint restored,
and :func:`record_resume_changes` says what changed (a warning and ``logs/resume_log.jsonl``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings
import weakref
from pathlib import Path

LOCK_FILE = ".flowbp.lock"
#: A lock file that is still empty after this long belongs to a run killed while creating it.
EMPTY_LOCK_GRACE_S = 10.0
#: Keys that never make a resume differ in meaning (they always change, or only name where things go).
_ALWAYS_CHANGEABLE = ("resume_from_checkpoint", "resume_allow_changes", "output_dir")
_HELD: dict[str, list] = {}  # lock path -> [token, count]: re-entrant within one process


class OutputDirBusy(RuntimeError):
    """Another live run holds the output folder; the message names it (pid, host, start time)."""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from its owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


class OutputDirLock:
    """``with OutputDirLock(folder):`` or :meth:`acquire` / :meth:`release`; re-entrant in one process."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._created = False  # the folder did not exist: a run that fails early leaves nothing behind

    def _key(self) -> str:
        return str(self.path.resolve())

    def holder(self) -> dict | None:
        """The current holder's record, or None when there is no lock file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            rec = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            rec = {}
        return rec if isinstance(rec, dict) else {}

    def _stale(self, rec: dict) -> bool:
        pid, host = rec.get("pid"), rec.get("host")
        if not rec:  # empty or damaged: stale once old enough (a creator writes at once)
            try:
                return time.time() - self.path.stat().st_mtime > EMPTY_LOCK_GRACE_S
            except FileNotFoundError:
                return True
        if not isinstance(pid, int) or host != socket.gethostname():
            return False  # another machine: its liveness cannot be checked from here
        if pid == os.getpid():
            return self._key() not in _HELD  # our pid, but not our lock: a previous process's
        return not _alive(pid, rec.get("start_ticks"))

    def acquire(self) -> OutputDirLock:
        key = self._key() if self.path.parent.exists() else None
        if key is not None and key in _HELD:
            _HELD[key][1] += 1
            return self
        self._created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self._key()
        token = uuid.uuid4().hex
        rec = {"pid": os.getpid(), "host": socket.gethostname(), "start_ticks": _start_ticks(os.getpid()),
               "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._stale(holder):
                    who = (f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"
                           if holder else "a run that is creating it")
                    raise OutputDirBusy(f"output_dir: {self.folder} is in use by {who}; wait for that run, use "
                                        f"another output_dir, or delete {self.path} if that run is gone") from None
                aside = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{token[:8]}")
                try:  # one taker wins the rename; the others retry and find the new lock
                    os.replace(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(rec))
                f.flush()
                os.fsync(f.fileno())
            _HELD[key] = [token, 1]
            return self
        raise OutputDirBusy(f"output_dir: could not take {self.path} (another run keeps taking it)")

    def release(self) -> None:
        key = self._key()
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        rec = self.holder()
        if rec and rec.get("token") == held[0]:  # never remove a lock someone else took over
            self.path.unlink(missing_ok=True)
            if self._created:
                try:
                    self.folder.rmdir()  # only if the run wrote nothing else
                except OSError:
                    pass

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim(owner, folder: str | os.PathLike, state):
    """Lock ``folder`` for ``owner`` (a Trainer) with :func:`claim_output_dir`; returns the release, a callable
    that runs once: when called, or when ``owner`` is garbage-collected without calling it."""
    lock, held = OutputDirLock(folder), {"held": False}
    release = weakref.finalize(owner, _release_held, lock, held)
    held["held"] = claim_output_dir(lock, state)
    return release


def _release_held(lock: OutputDirLock, held: dict) -> None:
    if held["held"]:
        held["held"] = False
        lock.release()


def claim_output_dir(lock: OutputDirLock, state) -> bool:
    """Take ``lock`` on rank 0 and remove the temporary folders a killed run left there; every rank raises
    OutputDirBusy if the folder is busy (``state``: the run's ``distributed.DistState``). Returns whether
    this process holds the lock."""
    from flowbp_train import checkpoint as ckpt
    from flowbp_train import distributed as D

    err, held = None, False
    if state.is_main:
        try:
            lock.acquire()
            held = True
            ckpt.remove_stale_temporaries(lock.folder)
        except OutputDirBusy as exc:
            err = str(exc)
    D.raise_if_any(err, OutputDirBusy, state)
    return held


# ------------------------------------------------------------------------------------- resuming
def find_resume(output_dir: Path, cfg, state) -> tuple[Path, tuple[dict, dict], dict] | None:
    """The checkpoint ``cfg.resume_from_checkpoint`` names, verified on every rank (manifest, sizes and
    hashes of the files this rank reads, trainer state) and compared with ``cfg``: ``(folder,
    (manifest, trainer_state), changes)``, or None when there is nothing to resume. Raises CheckpointError
    (on every rank when one fails) or ConfigError (a fixed key changed, another strategy)."""
    from flowbp_train import checkpoint as ckpt
    from flowbp_train import distributed as D
    from flowbp_train.config import ConfigError

    spec = cfg.resume_from_checkpoint
    err, found = None, None
    try:
        folder = ckpt.resolve_checkpoint(output_dir, spec)
        if folder is not None:
            names = ckpt.distributed_files(ckpt.read_manifest(folder), state.rank) if state.enabled else None
            found = folder, ckpt.verify_checkpoint(folder, names)
    except ckpt.CheckpointError as exc:
        err = str(exc)
    D.raise_if_any(err, ckpt.CheckpointError, state)
    if found is None:
        if spec == "latest":
            warnings.warn(f"resume_from_checkpoint=latest: no checkpoint in {output_dir}; starting fresh",
                          stacklevel=4)
        return None
    folder, (man, saved) = found
    strategy = cfg.distributed_strategy if state.enabled else "none"
    if man["world_size"] == state.world_size and saved.get("strategy", strategy) != strategy:
        raise ConfigError(f"distributed_strategy: {folder} was written with {saved.get('strategy')!r}, this "
                          f"run uses {strategy!r}; resume with the same strategy")
    changes = resume_changes(saved["config"], cfg, allow=cfg.resume_allow_changes)
    return folder, (man, saved), changes


def resume_changes(saved: dict, cfg, *, allow: bool) -> dict[str, tuple]:
    """``{key: (old, new)}`` of the keys that differ between the checkpoint's config and ``cfg``. Raises
    ConfigError naming the keys of ``RESUME_FIXED_KEYS`` that changed, unless ``allow``."""
    from flowbp_train.config import RESUME_FIXED_KEYS, ConfigError

    new = json.loads(json.dumps(cfg.to_dict(), default=str))  # the same normal form the checkpoint holds
    saved = dict(saved)
    for d in (saved, new):  # lora_alpha null means alpha = rank: compare what the weights were scaled by
        if d.get("lora_alpha") is None and isinstance(d.get("rank"), int):
            d["lora_alpha"] = float(d["rank"])
    keys = sorted((set(saved) | set(new)) - set(_ALWAYS_CHANGEABLE))
    changes = {k: (saved.get(k), new.get(k)) for k in keys if saved.get(k) != new.get(k)}
    fixed = [k for k in RESUME_FIXED_KEYS if k in changes]
    if fixed and not allow:
        detail = "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in fixed)
        raise ConfigError(f"{fixed[0]}: the checkpoint was trained with other {', '.join(fixed)} ({detail}); "
                          f"resume with the same values, or set resume_allow_changes=true")
    return changes


def apply_resumed_settings(optimizer, lr_scheduler, ema, cfg) -> None:
    """After a checkpoint restored the optimizer, scheduler and EMA: the config's learning rate, betas,
    epsilon, weight decay and EMA decay apply from the next step (the restored state holds the old ones).
    The LR of the next step is the new schedule (built from the new config) at the restored position, by
    the same expression LambdaLR uses, so an unchanged config resumes bit for bit."""
    for g in optimizer.param_groups:
        g["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        g["eps"] = cfg.adam_epsilon
        g["weight_decay"] = cfg.adam_weight_decay
        g["initial_lr"] = cfg.learning_rate
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    lr_scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    if lambdas is not None:
        for g, lam, base in zip(optimizer.param_groups, lambdas, lr_scheduler.base_lrs):
            g["lr"] = base * lam(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    if ema is not None:
        ema.decay = cfg.ema_decay


def record_resume_changes(log_dir: Path, folder: Path, step: int, changes: dict[str, tuple]) -> None:
    """Say which settings a resume changed (a warning, and one line of ``log_dir/resume_log.jsonl``);
    nothing when only ``resume_from_checkpoint`` differs."""
    changed = {k: v for k, v in changes.items() if k not in ("resume_from_checkpoint",)}
    if not changed:
        return
    lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
    warnings.warn(f"resumed {folder} at step {step} with changed settings: {lines}", stacklevel=3)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "resume_log.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "checkpoint": str(folder),
                            "changed": {k: list(v) for k, v in changed.items()}}, default=str) + "\n")


def cut_log(path: Path, step: int) -> int:
    """Keep the records of ``train_log.jsonl`` up to ``step`` (the resumed step; 0 for a fresh start), so
    that a redone step appears once; rewritten atomically. Returns the number of records dropped."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
        except json.JSONDecodeError:
            ok = False  # a line cut by a kill
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(x + "\n" for x in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped
