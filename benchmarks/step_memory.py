"""Peak GPU memory of one training step per family, method and executor, at 512 and 1024 px.

``--mode simulate`` (default, any machine): ``flowbp_train.memory.plan_memory`` on each recipe at full size
(published architectures, no weights, no GPU): the trainer's own step with the adapters, VAE decode and
the reward tower, under fake tensors; the table is labelled "simulated". ``--mode real``: the same trainer
step with real randomly initialised weights on ``--device`` (a GPU: ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved``; CPU with ``--size tiny``: a smoke run, bytes from the tracker). ``--compare
FILE``: the GPU kit's measured JSON lines (family, resolution, batch, executor, method,
peak_allocated_bytes, peak_reserved_bytes) beside the simulated rows, with the ratios. Prints a table and
writes JSON with device, versions and git revision in every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import git_revision, write_json  # noqa: E402

GiB = 2**30
FAMILIES = ("flux1", "sd3", "flux2")


def recipe_config(family: str, method: str, executor: str, res: int, batch: int | None, num_steps: int | None,
                  extra: list[str]):
    from flowbp_train.config import load_config

    ov = [f"executor={executor}", f"resolution={res}"] + ([f"train_batch_size={batch}"] if batch else [])
    ov += [f"num_steps={num_steps}"] if num_steps else []
    return load_config(ROOT / "recipes" / family / f"{method}.yaml", ov + extra, check=False)


def simulate_row(cfg) -> dict:
    from flowbp_train.memory import plan_memory

    p = plan_memory(cfg)
    return {"peak_live_gib": p.peak_bytes / GiB, "peak_phase": p.peak_phase,
            "allocated_gib": p.allocated_bytes / GiB, "reserved_gib": p.reserved_bytes / GiB,
            "sample_reserved_gib": p.sample_reserved_bytes / GiB, "total_gib": p.total_bytes / GiB,
            "breakdown_gib": {k: v / GiB for k, v in p.breakdown.items()}, "sim_seconds": p.seconds,
            "kind": "simulated"}


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
            for r in json.loads(sim_path.read_text()) if r.get("kind") == "simulated"}
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["simulate", "real"], default="simulate")
    ap.add_argument("--device", default="cuda", help="--mode real: the device (cuda, or cpu with --size tiny)")
    ap.add_argument("--size", choices=["full", "tiny"], default="full", help="--mode real: tiny widths for CPU")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=["flowbp-lagrange"])
    ap.add_argument("--executors", nargs="+", default=["streaming", "retain"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--batch", type=int, default=1, help="per-GPU batch (0: the recipe's)")
    ap.add_argument("--num-steps", type=int, default=None, help="rollout steps (default: the recipe's)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="more config overrides")
    ap.add_argument("--compare", type=Path, help="measured JSON lines of the GPU kit to put beside the simulation")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "step_memory.json")
    args = ap.parse_args(argv)
    if args.compare is not None:
        compare(args.out, args.compare, args.out.with_name("step_memory_compare.json"))
        return
    import torch

    rows = []
    print(f"{'family':6} {'method':16} {'executor':9} {'res':>5} {'b':>2} {'live':>7} {'reserved':>8} {'total':>7}  "
          f"peak set in ({args.mode}; GiB)")
    for fam in args.families:
        for res in args.resolutions:
            for method in args.methods:
                for ex in args.executors:
                    cfg = recipe_config(fam, method, ex, res, args.batch or None, args.num_steps, args.set)
                    row = {"family": fam, "method": method, "executor": ex, "resolution": res,
                           "batch": cfg.train_batch_size, "num_steps": cfg.num_steps}
                    row.update(simulate_row(cfg) if args.mode == "simulate" else real_row(cfg, args.device, args.size))
                    row.update(torch=torch.__version__, git=git_revision(), host=f"python {sys.version.split()[0]}")
                    rows.append(row)
                    if row["kind"] == "simulated":
                        print(f"{fam:6} {method:16} {ex:9} {res:5} {row['batch']:2} {row['peak_live_gib']:7.2f} "
                              f"{row['reserved_gib']:8.2f} {row['total_gib']:7.2f}  {row['peak_phase']}", flush=True)
                    else:
                        print(f"{fam:6} {method:16} {ex:9} {res:5} {row['batch']:2} {row}", flush=True)
    write_json(args.out, rows, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
