"""Speed of the fused ops on every available backend against torch eager and torch.compile.

Shapes of the real models (FLUX.1 at 512/1024 px: 1024/4096 tokens x 64 channels; SD3.5-M latents
16x64x64 and 16x128x128; FLUX.2-Klein at 1024 px: 4096 tokens x 128 channels), batch 1/4/8. Reports
microseconds (median over rounds in which every implementation runs once, in alternation; on a GPU CUDA
events around each call with an L2 flush before it, see _common.DeviceTimer), GB/s by the bytes the op
must move at least (each input read once, each output written once), that rate as a fraction of a large
device copy and of a copy moving the same bytes, both timed the same way in the same run, and the
speedup over eager and compile. Honest on a shared CPU: re-executes itself with OMP_WAIT_POLICY=PASSIVE
and a glibc malloc that keeps freed memory (else eager pays page faults on every temporary). Table on
stdout, JSON in results/; ``--jsonl`` appends each row as it is measured, ``--budget-s`` starts no case
after that many seconds (the GPU kit's time limit).

    python benchmarks/kernel_speed.py                 # CPU default: FLUX.1 1024 px, batch 1
    python benchmarks/kernel_speed.py --all           # every shape and batch (GPU)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

_STEADY_ENV = {
    "OMP_WAIT_POLICY": "PASSIVE",
    # glibc: never return freed blocks to the OS and never mmap them, so temporaries are reused
    "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(1 << 28),
}
if __name__ == "__main__" and any(os.environ.get(k) != v for k, v in _STEADY_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **_STEADY_ENV})

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DeviceTimer, append_jsonl, git_revision, write_json  # noqa: E402

import flowbp_kernels as fb  # noqa: E402
from flowbp_kernels.ops import _euler_cache_step as ecs  # noqa: E402 - the op modules: their backend tables
from flowbp_kernels.ops import _lagrange_leap as ll  # noqa: E402
from flowbp_kernels.ops import _surrogate_vjp as sv  # noqa: E402
from flowbp_kernels.ops import reference as ref  # noqa: E402

SHAPES = {
    "flux1-512": (1024, 64),
    "flux1-1024": (4096, 64),
    "sd35m-512": (16, 64, 64),
    "sd35m-1024": (16, 128, 128),
    "flux2klein-1024": (4096, 128),
}
REPO = Path(__file__).resolve().parents[1]
OPS = ("lagrange_leap_fwd", "lagrange_leap_bwd", "surrogate_vjp", "euler_cache_step")
#: Bytes moved by the reference copy: far past every cache (1 GiB on a GPU; 256 MiB on a CPU).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


def _nb(t_dtype: torch.dtype, n: int) -> int:
    return n * torch.empty((), dtype=t_dtype).element_size()


def _compiled(fn):
    return torch.compile(fn, backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)


COMPILE_BACKEND = "inductor"


# every configuration is its own graph: let dynamo keep them all
torch._dynamo.config.recompile_limit = 4096
torch._dynamo.config.accumulated_recompile_limit = 1 << 16


def cases(shape, batch, device, ops, node_dtypes, ps, make=None):
    """(op, variant, bytes, {impl_name: callable}) for each benchmarked configuration; ``make(shape, dtype)``
    replaces the random inputs (tests/kernels/ops/triton_aot.py records the launches on empty tensors)."""
    full = (batch, *shape)
    n = batch
    for s in shape:
        n *= s
    g = torch.Generator(device=device).manual_seed(0)
    rnd = (lambda dt: make(full, dt)) if make else (lambda dt: torch.randn(full, generator=g, device=device).to(dt))
    out = []
    for ndt in node_dtypes:
        tag = {torch.float32: "fp32", torch.bfloat16: "bf16"}[ndt]
        if "lagrange_leap_fwd" in ops:
            for p in ps:
                anchor, target, base = rnd(torch.float32), rnd(torch.float32), rnd(torch.float32)
                nodes = [rnd(ndt) for _ in range(p)]
                w = [0.3 * (m + 1) for m in range(p)]
                nbytes = _nb(torch.float32, 4 * n) + p * _nb(ndt, n)
                impls = {"eager": lambda a=anchor, u=nodes, w=w, t=target, b=base: ref.lagrange_leap_ref(a, u, w, t, b)}
                impls["compile"] = _compiled(impls["eager"])
                for be in BACKENDS:
                    impls[be] = lambda be=be, a=anchor, u=nodes, w=w, t=target, b=base: ll._FORWARD[be](a, u, w, t, b)
                out.append(("lagrange_leap_fwd", f"P={p} nodes={tag}", nbytes, impls))
        if "lagrange_leap_bwd" in ops:
            for p in ps:
                gr = rnd(torch.float32)
                w, s = [0.3 * (m + 1) for m in range(p)], [0.5] * p
                nbytes = _nb(torch.float32, n) + p * _nb(ndt, n)
                impls = {"eager": lambda g=gr, w=w, s=s, p=p, d=ndt: ref.lagrange_leap_bwd_ref(g, w, s, [d] * p)}
                impls["compile"] = _compiled(impls["eager"])
                coefs = [a * b for a, b in zip(w, s)]
                for be in BACKENDS:
                    impls[be] = lambda be=be, g=gr, c=coefs, d=ndt: sv._IMPL[be](g, None, c, d)
                out.append(("lagrange_leap_bwd", f"P={p} nodes={tag}", nbytes, impls))
        if "surrogate_vjp" in ops:
            up, adj = rnd(torch.float32), rnd(torch.float32)
            p = 3
            cs = [0.5, -1.0, 2.0]
            nbytes = _nb(torch.float32, 2 * n) + p * _nb(ndt, n)
            impls = {"eager": lambda u=up, a=adj, c=cs, d=ndt: ref.surrogate_vjp_ref(u, a, c, d)}
            impls["compile"] = _compiled(impls["eager"])
            for be in BACKENDS:
                impls[be] = lambda be=be, u=up, a=adj, c=cs, d=ndt: sv._IMPL[be](u, a, c, d)
            out.append(("surrogate_vjp", f"P=3 +adjoint out={tag}", nbytes, impls))
        if "euler_cache_step" in ops:
            for fmt in ("fp32", "bf16", "fp8"):
                x, v = rnd(torch.float32), rnd(ndt)
                # bytes: read x and v, write x_next, plus the cached latent / velocity where they are not v or x
                db = {"fp32": 0 if ndt == torch.float32 else 4, "bf16": 2, "fp8": 1}[fmt]
                lb = 0 if ndt == torch.float32 else _nb(ndt, n)
                scales = 4 * n // shape[-1] if fmt == "fp8" else 0
                nbytes = _nb(torch.float32, 2 * n) + _nb(ndt, n) + lb + db * n + scales
                # the cached latent is kept in the model's dtype (that of v), as in a real rollout
                impls = {
                    "eager": lambda x=x, v=v, f=fmt, d=ndt: ref.euler_cache_step_ref(
                        x, v, -0.05, velocity_format=f, latent_dtype=d
                    )
                }
                impls["compile"] = _compiled(impls["eager"])
                for be in BACKENDS:
                    impls[be] = lambda be=be, x=x, v=v, f=fmt, d=ndt: ecs._IMPL[be](x, v, -0.05, f, d)
                out.append(("euler_cache_step", f"format={fmt} v={tag}", nbytes, impls))
    return out


def available_backends(device: str) -> list[str]:
    b = fb.backends()
    names = []
    if device == "cpu" and b["cpu"].startswith("available"):
        names.append("cpu")
    if device == "cuda":
        if b["cuda"].startswith("available"):
            names.append("cuda")
        if b["triton"].startswith("available"):
            names.append("triton")
    return names


def main(argv=None) -> int:
    global BACKENDS, COMPILE_BACKEND
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--p", nargs="+", type=int, default=[1, 3, 5])
    ap.add_argument("--node-dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--all", action="store_true", help="every shape and batch (1, 4, 8)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the 'compile' column")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "kernel_speed.json"))
    ap.add_argument("--jsonl", default=None, help="append every row to this JSON-lines file as it is measured")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = args.device
    on_gpu = device == "cuda"
    shapes = args.shapes or (sorted(SHAPES) if args.all or on_gpu else ["flux1-1024"])
    batches = args.batches or ([1, 4, 8] if args.all or on_gpu else [1])
    rounds = args.rounds or (50 if on_gpu else 15)
    BACKENDS = available_backends(device)
    COMPILE_BACKEND = args.compile_backend
    ndts = [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.node_dtypes]
    timer = DeviceTimer(device)
    copy_gbs = timer.copy_gbps(COPY_BYTES["cuda" if on_gpu else "cpu"])
    same_size_copy: dict[int, float] = {}
    meta = {
        "device": torch.cuda.get_device_name(0) if on_gpu else f"{platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "python": sys.version.split()[0], "git": git_revision(),
        "tree_sha": os.environ.get("FLOWBP_TREE_SHA"),
        "backends": fb.backends(), "copy_GBps": copy_gbs, "rounds": rounds, "compile_backend": args.compile_backend,
        "timing": "cuda events, L2 flush before each call, median" if on_gpu else "host clock, median (in cache)",
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")},
    }  # fmt: skip
    print(f"# device: {meta['device']}; torch {meta['torch']}; git {meta['git']}; copy bandwidth {copy_gbs:.1f} GB/s "
          f"({meta['timing']})")
    head = f"{'op':18} {'variant':26} {'shape':16} {'B':>2} {'impl':8} {'us':>10} {'GB/s':>7} {'%copy':>6} " \
           f"{'%same':>6} {'x eager':>8} {'x compile':>9}"  # fmt: skip
    print(head)
    rows = []
    for shape_name in shapes:
        for b in batches:
            for op, variant, nbytes, impls in cases(SHAPES[shape_name], b, device, args.ops, ndts, args.p):
                if args.budget_s is not None and time.perf_counter() - t_start > args.budget_s:
                    skipped = {"op": op, "variant": variant, "shape": shape_name, "batch": b,
                               "skipped": f"time budget of {args.budget_s:g} s spent", **meta}
                    rows.append(skipped)
                    append_jsonl(args.jsonl, skipped)
                    print(f"{op:18} {variant:26} {shape_name:16} {b:>2} skipped (time budget)", flush=True)
                    continue
                if args.no_compile:
                    impls.pop("compile")
                try:
                    us = timer.time(impls, rounds)
                except Exception as exc:  # noqa: BLE001 - one failing implementation must not lose the others' rows
                    row = {"op": op, "variant": variant, "shape": shape_name, "batch": b,
                           "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", **meta}
                    rows.append(row)
                    append_jsonl(args.jsonl, row)
                    print(f"{op:18} {variant:26} {shape_name:16} {b:>2} error: {row['error']}", flush=True)
                    continue
                if nbytes not in same_size_copy:
                    same_size_copy[nbytes] = timer.copy_gbps(nbytes)
                for impl, t in us.items():
                    gbs = nbytes / t / 1e3
                    row = {
                        "op": op, "variant": variant, "shape": shape_name, "dims": [b, *SHAPES[shape_name]],
                        "batch": b, "impl": impl, "us": t, "bytes": nbytes, "GBps": gbs, "frac_copy": gbs / copy_gbs,
                        "copy_same_bytes_GBps": same_size_copy[nbytes],
                        "frac_copy_same_bytes": gbs / same_size_copy[nbytes], "speedup_eager": us["eager"] / t,
                        "speedup_compile": us["compile"] / t if "compile" in us else None, **meta,
                    }  # fmt: skip
                    rows.append(row)
                    append_jsonl(args.jsonl, row)
                    sc = f"{row['speedup_compile']:9.2f}" if row["speedup_compile"] else f"{'-':>9}"
                    print(f"{op:18} {variant:26} {shape_name:16} {b:>2} {impl:8} {t:10.1f} {gbs:7.1f} "
                          f"{100 * gbs / copy_gbs:6.1f} {100 * row['frac_copy_same_bytes']:6.1f} "
                          f"{row['speedup_eager']:8.2f} {sc}", flush=True)  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out), {"meta": meta, "rows": rows}, indent=1)
        print(f"# wrote {args.out}")
    return 0


BACKENDS: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
