"""Saved-for-backward bytes and step time vs the number of active steps, retain vs streaming.

For K = 1, 2, 4, 8, 16 active steps (FlowBP-Sparse with an explicit late-biased active set) and for full
backprop, run one reward-backprop step on a small random DiT and count the peak bytes autograd keeps
for backward (saved_tensors_hooks; deterministic on any device) and the median wall time. Target
(issue 2): streaming's peak at K = 16 within 10% of K = 1; retain grows about linearly.
Usage: python benchmarks/memory_scaling.py [--steps 25] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QuadraticReward, SavedBytes, TinyDiT, median_time, metadata, write_json  # noqa: E402

import flowbp_kernels as fb  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--width", type=int, default=128)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    n = args.steps
    sig = fb.flow_sigmas(n, shift=3.0)
    net = TinyDiT(tokens=args.tokens, width=args.width, depth=2)
    net.sigmas = sig
    x0 = torch.randn(args.batch, args.tokens, net.channels)
    ro = fb.rollout(net, x0, sig)
    reward = QuadraticReward((args.tokens, net.channels))
    rollout_time = median_time(lambda: fb.rollout(net, x0, sig), 1)

    rows = []
    configs = [("flowbp-sparse", k) for k in (1, 2, 4, 8, 16)] + [("full", n)]
    for name, k in configs:
        m = fb.get_method(name)
        plan = m.plan(n, active=list(range(n - k, n))) if name != "full" else m.plan(n)
        for ex in fb.EXECUTORS:
            def step(m=m, plan=plan, ex=ex):
                net.zero_grad(set_to_none=True)
                fb.reward_backprop(m, net, ro, reward, plan=plan, executor=ex)

            with SavedBytes() as meter:
                step()
            t = median_time(step, args.repeats)
            rows.append({"method": name, "K": k, "executor": ex, "peak_saved_bytes": meter.peak, "step_s": t})
    base = {ex: next(r["peak_saved_bytes"] for r in rows if r["K"] == 1 and r["executor"] == ex)
            for ex in fb.EXECUTORS}
    print(f"# memory_scaling: N={n} batch={args.batch} tokens={args.tokens} width={args.width} "
          f"(rollout {rollout_time:.3f} s); {metadata()}")
    print(f"{'method':15s} {'K':>3s} {'executor':10s} {'peak saved MiB':>15s} {'x K=1':>7s} {'step s':>8s}")
    for r in rows:
        ratio = r["peak_saved_bytes"] / base[r["executor"]]
        r["ratio_to_k1"] = ratio
        print(f"{r['method']:15s} {r['K']:3d} {r['executor']:10s} {r['peak_saved_bytes'] / 2**20:15.2f} "
              f"{ratio:7.2f} {r['step_s']:8.3f}")
    s16 = next(r for r in rows if r["K"] == 16 and r["executor"] == "streaming")
    ok = s16["ratio_to_k1"] <= 1.10
    print(f"target: streaming peak at K=16 within 10% of K=1: {'met' if ok else 'NOT met'} "
          f"({s16['ratio_to_k1']:.3f}x)")
    path = write_json("memory_scaling", {"meta": metadata(), "args": vars(args), "rollout_s": rollout_time,
                                         "rows": rows, "target_met": ok})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
