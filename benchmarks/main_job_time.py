"""Benchmark: the quick start's whole command on a quiet and on a busy machine, with and without the thread policy.

Times ``flowbp-train recipes/mini/flowbp-lagrange.yaml`` as a user runs it (a fresh process each time,
wall clock from start to exit, the median over ``--runs``), in up to four conditions: quiet or beside
one competing CPU-bound process (``python -c "while True: pass"``), and with the thread policy of
``flowbp_train.threads`` (the default) or without it (``FLOWBP_THREAD_POLICY=off``: torch's defaults).
The user's own OMP_* / MKL_* variables are removed from the runs' environment (the default experience
is measured). Prints a table and writes benchmarks/results/main_job_time.json. Run it alone: every other
process on the machine counts as load (the load average before each run is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml"
USER_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
             "FLOWBP_THREAD_POLICY")
#: The competing process starts this long before the run, so that it is running when the policy looks.
LEAD_SECONDS = 1.0


def _command() -> list[str]:
    script = Path(sys.executable).parent / "flowbp-train"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from flowbp_train.cli import train_main; sys.exit(train_main())"]


def one_run(policy: bool, busy: bool, steps: int | None, timeout: float) -> dict:
    """One whole run; returns its wall time, exit status, the policy's log line and the median step."""
    env = {k: v for k, v in os.environ.items() if k not in USER_VARS}
    if not policy:
        env["FLOWBP_THREAD_POLICY"] = "off"
    rival = None
    with tempfile.TemporaryDirectory(prefix="flowbp-main-job-") as out:
        args = [*_command(), str(RECIPE), f"output_dir={out}", "progress_bar=false"]
        if steps is not None:
            args.append(f"max_train_steps={steps}")
        try:
            if busy:
                rival = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env)
                time.sleep(LEAD_SECONDS)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
                rc, err = proc.returncode, proc.stderr
            except subprocess.TimeoutExpired as exc:
                rc, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(
                    exc.stderr, bytes) else (exc.stderr or "")
            wall = time.perf_counter() - t0
        finally:
            if rival is not None:
                rival.kill()
                rival.wait()
        steps_s = []
        log = Path(out) / "logs" / "train_log.jsonl"
        if log.is_file():
            steps_s = [json.loads(line)["step_time"] for line in log.read_text().splitlines() if line.strip()]
    line = next((ln for ln in err.splitlines() if "CPU threads" in ln), "")
    return {"wall_s": wall, "rc": rc, "policy_line": line, "load_before": load,
            "median_step_s": statistics.median(steps_s) if steps_s else None, "steps": len(steps_s)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="whole runs per condition (the median is reported)")
    p.add_argument("--conditions", nargs="*", default=["quiet", "busy"], choices=["quiet", "busy"])
    p.add_argument("--baseline", action="store_true",
                   help="also run without the policy (FLOWBP_THREAD_POLICY=off; busy runs then take minutes)")
    p.add_argument("--baseline-runs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="max_train_steps override (default: the recipe's 60)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is stopped")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "main_job_time.json"))
    a = p.parse_args(argv)
    if a.runs < 1 or a.baseline_runs < 1:
        p.error("--runs and --baseline-runs must be >= 1")
    plan = [(True, c == "busy", a.runs) for c in a.conditions]
    if a.baseline:
        plan += [(False, c == "busy", a.baseline_runs) for c in a.conditions]
    rows = []
    for policy, busy, runs in plan:
        done = []
        for k in range(runs):
            r = one_run(policy, busy, a.steps, a.timeout)
            done.append(r)
            print(f"policy {'on ' if policy else 'off'} {'busy ' if busy else 'quiet'} run {k + 1}/{runs}: "
                  f"{r['wall_s']:.1f} s (rc {r['rc']}, median step {r['median_step_s'] or float('nan'):.2f} s, "
                  f"load before {r['load_before']:.2f}) {r['policy_line']}", flush=True)
        walls = [r["wall_s"] for r in done]
        rows.append({"policy": policy, "busy": busy, "runs": done, "median_wall_s": statistics.median(walls),
                     "min_wall_s": min(walls), "max_wall_s": max(walls),
                     "median_step_s": statistics.median([r["median_step_s"] for r in done if r["median_step_s"]]
                                                        or [float("nan")])})
    print("\n| thread policy | machine | runs | wall s, median (min-max) | median step s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on (default)' if r['policy'] else 'off (torch defaults)'} | "
              f"{'one competing process' if r['busy'] else 'quiet'} | {len(r['runs'])} | "
              f"{r['median_wall_s']:.1f} ({r['min_wall_s']:.1f}-{r['max_wall_s']:.1f}) | {r['median_step_s']:.2f} |")
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = "unknown"
    info = {"command": " ".join([*_command(), str(RECIPE.relative_to(ROOT))]), "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "git": git, "steps": a.steps or 60}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
