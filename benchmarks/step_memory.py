"""Peak GPU memory of one training run per family, method and executor, at 512 and 1024 px (per rank).

``--mode simulate`` (default, any machine): ``flowbp_train.memory.plan_memory`` on each recipe at full size
(published architectures, no weights, no GPU): the trainer's own setup (prompts encoded with the text
encoders on the device, then offloaded), one training step with the adapters, VAE decode and the reward
tower, and one sample step, under fake tensors; ``--world-size N`` plans rank 0 of N ranks with the
recipe's ``distributed_strategy`` (``--set distributed_strategy=fsdp2``). Rows run in ``--jobs`` parallel
processes (one fresh process per row; the wall time of each row is in its JSON). The table is labelled
"simulated". ``--mode real``: the same trainer step with real randomly initialised weights on
``--device`` (a GPU: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``; CPU with ``--size
tiny``: a smoke run). ``--compare FILE``: the GPU kit's measured JSON lines (family, resolution, batch,
executor, method, peak_allocated_bytes, peak_reserved_bytes) beside the simulated rows, with the ratios.
Prints a table and writes JSON with device, versions and git revision in every row.

    python benchmarks/step_memory.py                                  # 3 families x 2 executors x 512/1024
    python benchmarks/step_memory.py --methods all --jobs 2          # the whole matrix (3 x 9 x 2 x 2)
    python benchmarks/step_memory.py --families flux1 --resolutions 512 --batch 0    # the recipe's batch
    python benchmarks/step_memory.py --families flux1 --executors streaming --resolutions 512 \\
        --set rank=0 distributed_strategy=fsdp2 --world-size 8 --out benchmarks/results/step_memory_fsdp2.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import git_revision, write_json  # noqa: E402

GiB = 2**30
#: the recipe folders every shipped architecture (flowbp_train/memory/architectures/*.json) has
FAMILIES = tuple(f for f in sorted(json.loads(p.read_text()).get("family", "") for p in
                                   (ROOT / "python" / "flowbp_train" / "memory" / "architectures").glob("*.json"))
                 if f and (ROOT / "recipes" / f).is_dir())
METHODS = ("flowbp-lagrange", "flowbp-bridge", "flowbp-sparse", "full", "leapalign", "draft-k", "draft-lv", "drtune",
           "refl")


def recipe_config(family: str, method: str, executor: str, res: int, batch: int | None, num_steps: int | None,
                  extra: list[str]):
    from flowbp_train.config import load_config

    ov = [f"executor={executor}"] + ([f"resolution={res}"] if res else [])
    ov += [f"train_batch_size={batch}"] if batch else []
    ov += [f"num_steps={num_steps}"] if num_steps else []
    return load_config(ROOT / "recipes" / family / f"{method}.yaml", ov + extra, check=False)


def simulate_row(cfg, world_size: int = 1) -> dict:
    from flowbp_train.memory import plan_memory

    t0 = time.perf_counter()
    p = plan_memory(cfg, world_size=world_size)
    return {"peak_live_gib": p.peak_bytes / GiB, "peak_phase": p.peak_phase, "peak_stage": p.peak_stage,
            "stage_peaks_gib": {k: v / GiB for k, v in p.stage_peaks.items()},
            "allocated_gib": p.allocated_bytes / GiB, "reserved_gib": p.reserved_bytes / GiB,
            "reserved_phase": p.reserved_phase, "fixed_gib": sum(p.fixed.values()) / GiB,
            "total_gib": p.total_bytes / GiB, "breakdown_gib": {k: v / GiB for k, v in p.breakdown.items() if v},
            "weights_gib": {k: v / GiB for k, v in p.weights.items()}, "host_gib": p.host_peak_bytes / GiB,
            "world_size": p.world_size, "strategy": p.strategy, "rank": cfg.rank, "notes": p.notes,
            "sim_seconds": p.seconds, "row_seconds": time.perf_counter() - t0, "kind": "simulated"}


def real_row(cfg, device: str, size: str) -> dict:
    """One real training step with random weights (the adapters' code path, no re-implementation)."""
    import torch

    from flowbp_train.memory import build
    from flowbp_train.memory.planner import prepare_config
    from flowbp_train.trainer import Trainer

    cfg = prepare_config(cfg)
    cfg.device, cfg.report_to, cfg.progress_bar = device, "none", False
    spec = build.component_specs(cfg.family, None)
    if size == "tiny":
        spec["transformer"]["config"].update(spec["transformer"].pop("tiny"))
        spec["text_encoders"] = {}
    with torch.device(device):
        adapter, _ = build.build_adapter(cfg, spec=spec, device=device)
        reward = build.build_reward(cfg, config_override=build.tiny_clip_config() if size == "tiny" else None)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg.output_dir = tmp
        tr = Trainer(cfg, adapter=adapter, reward=reward)
        tr.training_step()  # warm-up: optimizer state and allocator cache in their steady state
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        tr.training_step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(), "step_s": time.perf_counter() - t0,
                    "kind": "measured", "device": torch.cuda.get_device_name()}
    return {"step_s": time.perf_counter() - t0, "kind": "real-cpu-smoke", "device": "cpu"}


def compare(sim_path: Path, measured_path: Path, out: Path) -> list[dict]:
    """Simulated rows beside measured JSON lines (matched on family, resolution, batch, executor, method)."""
    sims = {(r["family"], r["resolution"], r["batch"], r["executor"], r["method"]): r
            for r in json.loads(sim_path.read_text()) if r.get("kind") == "simulated" and r.get("world_size", 1) == 1}
    rows = []
    for n, line in enumerate(measured_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            key = (m["family"], int(m["resolution"]), int(m["batch"]), m["executor"], m["method"])
            alloc, res = int(m["peak_allocated_bytes"]), int(m["peak_reserved_bytes"])
        except (ValueError, KeyError, TypeError) as exc:
            need = "family, resolution, batch, executor, method, peak_allocated_bytes, peak_reserved_bytes"
            raise SystemExit(f"step_memory: error: {measured_path}:{n}: expected a JSON object with {need} ({exc})") \
                from None
        s = sims.get(key)
        if s is None:
            continue
        rows.append({"family": key[0], "resolution": key[1], "batch": key[2], "executor": key[3], "method": key[4],
                     "simulated_allocated_gib": s["allocated_gib"], "measured_allocated_gib": alloc / GiB,
                     "ratio_allocated": s["allocated_gib"] * GiB / alloc if alloc else None,
                     "simulated_reserved_gib": s["reserved_gib"], "measured_reserved_gib": res / GiB,
                     "ratio_reserved": s["reserved_gib"] * GiB / res if res else None, "device": m.get("device")})
    print(f"{'family':6} {'res':>5} {'b':>2} {'executor':9} {'method':16} {'sim alloc':>9} {'GPU alloc':>9} "
          f"{'ratio':>6} {'sim res':>8} {'GPU res':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['family']:6} {r['resolution']:5} {r['batch']:2} {r['executor']:9} {r['method']:16} "
              f"{r['simulated_allocated_gib']:9.2f} {r['measured_allocated_gib']:9.2f} {r['ratio_allocated']:6.3f} "
              f"{r['simulated_reserved_gib']:8.2f} {r['measured_reserved_gib']:8.2f} {r['ratio_reserved']:6.3f}")
    if not rows:
        print("no measured row matches a simulated one (pending a GPU run)")
    write_json(out, rows, indent=1)
    return rows


def _row(job: dict) -> dict:
    """One row, in its own process (``--jobs``): the config resolved and simulated (or run) there."""
    import torch

    if job["mode"] == "simulate":
        torch.set_num_threads(job["threads"])
    extra = job["set"] + (["rank=0"] if job["trainable"] == "full" else [])
    cfg = recipe_config(job["family"], job["method"], job["executor"], job["resolution"], job["batch"],
                        job["num_steps"], extra)
    row = {"family": job["family"], "method": job["method"], "executor": job["executor"],
           "resolution": cfg.resolution, "batch": cfg.train_batch_size, "num_steps": cfg.num_steps,
           "trainable": "full" if cfg.rank == 0 else f"LoRA r{cfg.rank}"}
    try:
        row.update(simulate_row(cfg, job["world_size"]) if job["mode"] == "simulate"
                   else real_row(cfg, job["device"], job["size"]))
    except Exception as exc:  # one failing row is reported; the others still run
        row.update(kind="failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
    row.update(torch=torch.__version__, git=git_revision(), host=f"python {sys.version.split()[0]}",
               torch_threads=torch.get_num_threads(), overrides=job["set"])
    return row


def _print_row(row: dict) -> None:
    head = (f"{row['family']:6} {row['method']:16} {row['trainable']:8} {row['executor']:9} {row['resolution']:5} "
            f"{row['batch']:2}")
    if row["kind"] == "simulated":
        print(f"{head} {row['peak_live_gib']:7.2f} {row['allocated_gib']:9.2f} {row['reserved_gib']:8.2f} "
              f"{row['total_gib']:7.2f} {row['row_seconds']:6.0f}  {row['peak_phase']} ({row['peak_stage']})",
              flush=True)
    else:
        print(f"{head} {row}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["simulate", "real"], default="simulate")
    ap.add_argument("--device", default="cuda", help="--mode real: the device (cuda, or cpu with --size tiny)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="--mode real: tiny widths for CPU")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=["flowbp-lagrange"], choices=[*METHODS, "all"])
    ap.add_argument("--executors", nargs="+", default=["streaming", "retain"], choices=["streaming", "retain"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024], help="0: the recipe's")
    ap.add_argument("--trainable", nargs="+", default=["lora"], choices=["lora", "full"],
                    help="lora: the recipe's LoRA rank; full: full fine-tuning (rank=0)")
    ap.add_argument("--batch", type=int, default=1, help="per-GPU batch (0: the recipe's)")
    ap.add_argument("--num-steps", type=int, default=None, help="rollout steps (default: the recipe's)")
    ap.add_argument("--world-size", type=int, default=1, help="--mode simulate: plan rank 0 of N ranks")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    ap.add_argument("--jobs", type=int, default=1, help="--mode simulate: rows in this many parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="--mode simulate: torch threads per row process")
    ap.add_argument("--compare", type=Path, help="measured JSON lines of the GPU kit to put beside the simulation")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "step_memory.json")
    args = ap.parse_args(argv)
    if args.compare is not None:
        compare(args.out, args.compare, args.out.with_name("step_memory_compare.json"))
        return
    if args.jobs < 1 or args.world_size < 1 or args.threads < 1:
        ap.error("--jobs, --world-size and --threads take an integer >= 1")
    if args.mode == "real" and args.jobs != 1:
        ap.error("--jobs: --mode real measures one row at a time on one device")
    methods = list(METHODS) if "all" in args.methods else args.methods
    jobs = [dict(family=fam, method=method, executor=ex, resolution=res, batch=args.batch or None,
                 num_steps=args.num_steps, set=args.set, world_size=args.world_size, mode=args.mode,
                 device=args.device, size=args.size, threads=args.threads, trainable=tr)
            for fam in args.families for res in args.resolutions for tr in args.trainable for method in methods
            for ex in args.executors]
    print(f"{'family':6} {'method':16} {'trains':8} {'executor':9} {'res':>5} {'b':>2} {'live':>7} {'allocated':>9} "
          f"{'reserved':>8} {'total':>7} {'row s':>6}  peak set in ({args.mode}, world size {args.world_size}; GiB)")
    t0 = time.perf_counter()
    rows = []
    if args.mode == "simulate":  # one fresh process per row: no state carried over, memory returned
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            for row in pool.map(_row, jobs):
                rows.append(row)
                _print_row(row)
                write_json(args.out, rows, indent=1)  # row by row: a stopped run keeps what it finished
    else:
        for job in jobs:
            rows.append(_row(job))
            _print_row(rows[-1])
            write_json(args.out, rows, indent=1)
    failed = [r for r in rows if r["kind"] == "failed"]
    write_json(args.out, rows, indent=1)
    print(f"wrote {args.out}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s with --jobs {args.jobs}"
          + (f"; {len(failed)} failed" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
