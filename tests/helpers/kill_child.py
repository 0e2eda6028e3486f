"""Process target of tests/train/test_kill_resume.py: one flowbp-train run of the miniature, started from a
forkserver that has imported everything (so a child starts in milliseconds), reporting each checkpoint
write's start and end on a pipe so that the test can SIGKILL it in the middle of one."""

from __future__ import annotations

import os
import time


def run(recipe: str, overrides: list[str], conn, threads: int) -> None:
    os.environ["FLOWBP_BACKEND"] = "torch"  # the trainer is under test, not the kernels
    os.environ["FLOWBP_JIT"] = "0"
    import threading

    import torch
    from tqdm.auto import tqdm

    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: a killed child would leak its semaphore
    from flowbp_train import checkpoint as ckpt
    from flowbp_train.config import load_config
    from flowbp_train.trainer import train

    real = ckpt.save_checkpoint

    def save(*args, **kwargs):
        conn.send(("begin", args[1]))
        t0 = time.perf_counter()
        out = real(*args, **kwargs)
        conn.send(("end", args[1], time.perf_counter() - t0))
        return out

    ckpt.save_checkpoint = save
    result = train(load_config(recipe, overrides))
    conn.send(("done", result.global_step))
