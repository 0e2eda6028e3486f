"""The per-step log of a run: a JSONL file always, tensorboard (default) and/or wandb (``report_to``).

``output_dir/<logging_dir>/train_log.jsonl`` gets one record per step (:func:`step_record`); the
numeric, finite scalars of a record also go to tensorboard and wandb as ``train/<key>``. Only rank 0
logs. On resume the JSONL log is cut back to the resumed step (``rundir.cut_log``), so a step that a
killed run logged after its last checkpoint appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from flowbp_train import rundir


def step_record(step: int, outs: list, *, lr: float, grad_norm: float | None, clipped: float | None,
                skipped: bool, seconds: float, device: torch.device) -> dict:
    """The log record of one optimizer step from its micro-steps' ``StepOutput`` (``outs``; empty when the
    step was skipped before any finished): loss (summed over micro-steps), mean reward and weight, the
    per-sample weights and rewards, gradient norms before and after clipping, the backward path of the
    last micro-step (``d_j``, ``d_0``, k / j / tau, active steps, per-node gradient norms), time, memory;
    ``reward_<term>`` for each term of a reward with ``terms()``."""
    rec = {"step": step, "skipped": skipped, "lr": lr, "grad_norm": grad_norm, "grad_norm_clipped": clipped,
           "step_time": seconds, "peak_memory_gb": _peak_memory_gb(device)}
    if outs:
        d = outs[-1].diagnostics
        rec.update(
            loss=sum(float(o.loss) for o in outs),
            reward=float(torch.cat([o.reward for o in outs]).float().mean()),
            weight=float(torch.cat([o.weight for o in outs]).float().mean()),
            weights=[float(w) for o in outs for w in o.weight],
            rewards=[float(r) for o in outs for r in o.reward],
            d_j=_mean(d.get("d_j")), d_0=_mean(d.get("d_0")),
            k=d.get("k"), j=d.get("j"), tau=d.get("tau"), active=list(d.get("active") or ()),
            node_grad_norms=[n.get("grad_norm") for n in d.get("nodes", [])],
        )
        for k in d.get("reward_terms") or {}:  # a reward made of terms: this rank's mean over its micro-batches
            rec[f"reward_{k}"] = sum(o.diagnostics["reward_terms"][k] for o in outs) / len(outs)
    else:
        rec.update(loss=None, reward=None)
    return rec


def _mean(t) -> float | None:
    return None if t is None else float(t.float().mean())


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS high-water (KiB -> GiB)


class Tracker:
    """Per-step log: a JSONL file always, tensorboard (default) and/or wandb (``report_to``)."""

    def __init__(self, cfg, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        log_dir = out / cfg.logging_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = log_dir / "train_log.jsonl"
        if cfg.report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir))
        if cfg.report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise ImportError("report_to: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.tracker_project_name, config=cfg.to_dict(), dir=str(out))

    def start(self, step: int) -> None:
        """Open the JSONL log at ``step`` (the resumed step, 0 for a fresh run): records of later steps,
        from a run that went on past its last checkpoint, are dropped, so each step is logged once."""
        if not self.enabled or self.jsonl is not None:
            return
        rundir.cut_log(self.jsonl_path, step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self.start(step - 1)
        self.jsonl.write(json.dumps(record, default=float) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v is not None and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
