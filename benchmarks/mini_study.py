"""Benchmark: the nine reward-backprop methods on the CPU miniature's three tasks, several seeds.

Every run is the trainer on a recipe of recipes/mini (digit: the quick start's; shift/ and bold/: the
study tasks), only the seed changing; logic in flowbp_train.mini.study. Writes study.json, curves.png,
decomposition.png and study.md (the tables of benchmarks/RESULTS.md) into --out and prints the tables.
Run on a quiet machine: ``python benchmarks/mini_study.py`` (50 steps, 3 seeds, about 30 min on 2 cores,
one worker process per idle core, one thread each); never beside another benchmark (step times).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=50, help="trainer steps per run (default 50)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="*", default=None, help="digit, shift, bold (default: all three)")
    p.add_argument("--methods", nargs="*", default=None, help="default: all nine")
    p.add_argument("--draws", type=int, default=4, help="plan draws per method for the gradient measures")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: one per idle core)")
    p.add_argument("--recipes", default=str(ROOT / "recipes" / "mini"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mini_study"))
    p.add_argument("--resume", action="store_true", help="keep the finished jobs of --out/jobs.jsonl")
    p.add_argument("--report-only", action="store_true",
                   help="run nothing: report the jobs --out/jobs.jsonl holds (implies --resume)")
    a = p.parse_args(argv)
    # the workers' thread settings are made by run_study before it starts them (flowbp_train.threads)
    from flowbp_train.mini.study import METHOD_ORDER, TASKS, StudyConfig, run_study

    cfg = StudyConfig(steps=a.steps, seeds=a.seeds, tasks=a.tasks or list(TASKS),
                      methods=a.methods or list(METHOD_ORDER), draws=a.draws, recipes_root=a.recipes)
    try:
        cfg.validate()
    except (ValueError, FileNotFoundError) as exc:
        print(f"mini_study: error: {exc}", file=sys.stderr)
        return 2
    run_study(cfg, workers=a.workers, out_dir=a.out, markdown=Path(a.out) / "study.md",
              resume=a.resume or a.report_only, run=not a.report_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
