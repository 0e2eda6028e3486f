"""How close is each method's gradient to the exact full-backprop gradient, and does it inflate?

On a small random DiT velocity model (float64, N steps), for every method: the cosine and norm ratio of
its parameter gradient against the exact full-backprop gradient (``full``, streaming; exact per the
tests), averaged over random plans and seeds; for LeapAlign and FlowBP-Lagrange, the same as a function
of the leap length j - k (explicit plans, j fixed near the end); and the gradient inflation of full
backprop: the normalised Frobenius norm of d x_N / d x_i against i (random-probe estimate), next to the
single Jacobian factor (I + alpha h_j J_j) of a bridge at j. Nothing is tuned.
Usage: python benchmarks/gradient_fidelity.py [--seeds 3] [--plans 8] [--gain 1.5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import QuadraticReward, TinyDiT, metadata, write_json  # noqa: E402

import flowbp_kernels as fb  # noqa: E402


def flat_grad(net):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in net.parameters()])


def grad_of(net, ro, reward, method, plan):
    net.zero_grad(set_to_none=True)
    fb.reward_backprop(method, net, ro, reward, plan=plan, executor="streaming")
    return flat_grad(net)


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def jac_norm(fn, x, probes):
    """sqrt(E ||J^T u||^2 / D) with u ~ N(0, I): the Frobenius norm of J over sqrt(D) (identity -> 1)."""
    x = x.detach().requires_grad_(True)
    y = fn(x)
    tot = 0.0
    for q, u in enumerate(probes):
        (g,) = torch.autograd.grad(y, x, u, retain_graph=q < len(probes) - 1)
        tot += float(g.pow(2).sum())
    return (tot / len(probes) / x.numel()) ** 0.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--plans", type=int, default=8)
    ap.add_argument("--gain", type=float, default=1.5)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    n = args.steps
    sig = fb.flow_sigmas(n, shift=3.0)
    per_method = {m: {"cos": [], "ratio": []} for m in fb.METHODS}
    leap_lengths = [1, 3, 6, 10, 15, 20]
    j_fixed = n - 3
    by_leap = {m: {L: [] for L in leap_lengths} for m in ("leapalign", "flowbp-lagrange")}
    inflation = [[] for _ in range(n)]
    bridge_factor = [[] for _ in range(n)]
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        net = TinyDiT(tokens=16, channels=4, width=32, depth=2, gain=args.gain, seed=seed).double()
        net.sigmas = sig
        x0 = torch.randn(args.batch, 16, 4, dtype=torch.float64)
        ro = fb.rollout(net, x0, sig)
        reward = QuadraticReward((16, 4), seed=seed + 100, dtype=torch.float64)
        full = fb.get_method("full")
        g_full = grad_of(net, ro, reward, full, full.plan(n))
        gen = torch.Generator().manual_seed(1000 + seed)
        for name in fb.METHODS:
            m = fb.get_method(name)
            for _ in range(1 if name == "full" else args.plans):
                g = grad_of(net, ro, reward, m, m.plan(n, gen))
                per_method[name]["cos"].append(cos(g, g_full))
                per_method[name]["ratio"].append(float(g.norm() / g_full.norm()))
        for name in by_leap:
            m = fb.get_method(name)
            for L in leap_lengths:
                g = grad_of(net, ro, reward, m, m.plan(n, k=j_fixed - L, j=j_fixed))
                by_leap[name][L].append(cos(g, g_full))
        probes = [torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + q))
                  for q in range(4)]
        h = [float(sig[i + 1] - sig[i]) for i in range(n)]
        for i in range(n):
            def to_end(x, i=i, net=net, h=h):
                for q in range(i, n):
                    x = x + h[q] * net(x, q)
                return x

            inflation[i].append(jac_norm(to_end, ro.latent(i), probes))
            alpha = fb.DEFAULTS["flowbp-bridge"]["alpha"]
            bridge_factor[i].append(
                jac_norm(lambda x, i=i, a=alpha, h=h, net=net: x + a * h[i] * net(x, i), ro.latent(i), probes))

    mean = lambda xs: sum(xs) / len(xs)
    print(f"# gradient_fidelity: N={n}, seeds={args.seeds}, plans/method={args.plans}, DiT gain={args.gain}; "
          f"{metadata()}")
    print("\n## Cosine and norm ratio vs exact full backprop (mean over random plans and seeds)")
    print("| method | cosine | norm ratio |\n|---|---:|---:|")
    table1 = []
    for name in fb.METHODS:
        c, r = mean(per_method[name]["cos"]), mean(per_method[name]["ratio"])
        table1.append({"method": name, "cosine": c, "norm_ratio": r})
        print(f"| {name} | {c:.3f} | {r:.3f} |")
    print(f"\n## Cosine vs leap length j - k (j = {j_fixed}, explicit plans, mean over seeds)")
    print("| j - k | " + " | ".join(by_leap) + " |\n|---:|" + "---:|" * len(by_leap))
    table2 = []
    for L in leap_lengths:
        row = {"leap": L, **{m: mean(by_leap[m][L]) for m in by_leap}}
        table2.append(row)
        print(f"| {L} | " + " | ".join(f"{row[m]:.3f}" for m in by_leap) + " |")
    print("\n## Gradient inflation: ||d x_N / d x_i||_F / sqrt(D) (full backprop) vs one bridge factor at i")
    print("| i | sigma_i | full backprop | I + alpha h_i J_i |\n|---:|---:|---:|---:|")
    table3 = []
    for i in range(n):
        row = {"i": i, "sigma": float(sig[i]), "full": mean(inflation[i]), "bridge": mean(bridge_factor[i])}
        table3.append(row)
        if i % 3 == 0 or i == n - 1:
            print(f"| {i} | {row['sigma']:.3f} | {row['full']:.3f} | {row['bridge']:.3f} |")
    path = write_json("gradient_fidelity", {"meta": metadata(), "args": vars(args), "methods": table1,
                                            "by_leap": table2, "inflation": table3})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
