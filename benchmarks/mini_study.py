"""Benchmark: every reward-backprop method on the CPU miniature, same steps, several seeds.

Prints a markdown table (also written to docs/readme/mini_results.md for benchmarks/RESULTS.md) and
writes benchmarks/results/mini_study/study.json and study.png. Logic in flowbp_train.mini.study.
Run: ``OMP_NUM_THREADS=1 python benchmarks/mini_study.py --steps 40 --seeds 3`` (about 20-30 min on 2
shared CPU cores); never run beside another benchmark (timings).
"""

from __future__ import annotations

import argparse

from flowbp_train.mini.study import run_study


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/mini_study")
    p.add_argument("--markdown", default="docs/readme/mini_results.md")
    a = p.parse_args(argv)
    run_study(steps=a.steps, seeds=a.seeds, out_dir=a.out, methods=a.methods, threads=a.threads,
              markdown=a.markdown or None)


if __name__ == "__main__":
    main()
