"""Ahead-of-time compilation of every Triton specialization the launchers produce, for sm_90, without a GPU.

Run as a script in a process without TRITON_INTERPRET (the kernels must be real JIT functions):
``python tests/kernels/ops/triton_aot.py [--json OUT]``. The launchers are called on CPU tensors of the shapes the
kernel tests, benchmarks/kernel_speed.py and benchmarks/gpu_correctness.py use, through the public ops
with FLOWBP_BACKEND=triton, with each kernel replaced by a recorder; the recorded arguments are bound and
specialized by Triton's own binder (dtypes, integer divisibility by 16, integers equal to 1, launch
options), deduplicated, and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``.
Checked on each: ptxas reports no spill, the PTX has no fp32 FMA (enable_fp_fusion=False) and the fp8
kernels divide with ``div.rn``. Prints one JSON summary line; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output on stdout, for the spill check
# a fresh cache: a cache hit would skip ptxas (no spill report) and prove nothing about this Triton
_CACHE = tempfile.TemporaryDirectory(prefix="flowbp-triton-aot-")
os.environ["TRITON_CACHE_DIR"] = _CACHE.name

import torch  # noqa: E402
import triton  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
# a script (run by hand or by test_triton_aot.py): the test modules it replays are beside it, the helpers
# package they import is tests/helpers, the benchmark shapes are benchmarks/'s
sys.path[:0] = [str(HERE), str(REPO / "tests"), str(REPO / "benchmarks")]

import flowbp_kernels as fb  # noqa: E402
from flowbp_kernels.triton import euler_cache_step as t_euler  # noqa: E402
from flowbp_kernels.triton import lagrange_leap as t_leap  # noqa: E402
from flowbp_kernels.triton import surrogate_vjp as t_vjp  # noqa: E402

TARGET = ("cuda", 90, 32)
KERNELS = {
    "euler_cache_step": (t_euler, "_euler_cache_step_kernel"),
    "lagrange_leap": (t_leap, "_lagrange_leap_fwd_kernel"),
    "surrogate_vjp": (t_vjp, "_surrogate_vjp_kernel"),
}


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call and launches nothing."""

    def __init__(self, name: str, fn):
        self.name, self.fn, self.calls = name, fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _test_calls(kh) -> None:
    """The launches of tests/kernels/ops (the parameter grids of test_euler_cache_step, test_lagrange_leap and
    test_surrogate_vjp; shapes and dtypes from helpers.kernels)."""
    e = torch.empty
    f32, bf16 = torch.float32, torch.bfloat16
    w = [0.7, -1.3, 0.25, 2.0, -0.5, 1.1, 0.9, -0.3, 0.6, 1.7]
    grid = [(b, 3, c) for c in kh.ROW_SIZES for b in kh.BATCHES]
    for shape in grid:
        for vd in kh.DTYPES:
            for fmt in ("fp32", "bf16", "fp8"):
                for ld in (f32, bf16):
                    fb.euler_cache_step(e(shape), e(shape, dtype=vd), -0.07, velocity_format=fmt, latent_dtype=ld)
            for p in (1, 2, 3, 4, 5):
                for target in (e(shape), None):
                    fb.lagrange_leap(e(shape), [e(shape, dtype=vd) for _ in range(p)], w[:p], target, base=e(shape))
                for adj in (None, e(shape)):
                    fb.surrogate_vjp(e(shape), adj, w[:p], out_dtype=vd)
    for fmt in ("fp32", "bf16", "fp8"):  # test_stated_error_bounds
        fb.euler_cache_step(e(4, 6, 129), e(4, 6, 129), -0.07, velocity_format=fmt)
    for p in (1, 3, 5, 9):  # test_mixed_node_dtypes_and_many_nodes
        nodes = [e(2, 3, 97, dtype=kh.DTYPES[m % 3]) for m in range(p)]
        for target in (e(2, 3, 97), None):
            fb.lagrange_leap(e(2, 3, 97), nodes, w[:p], target, base=e(2, 3, 97))
    for c in (7, 1025):  # test_backward_matches_reference: forward, then one surrogate_vjp per node dtype
        for vd in kh.DTYPES:
            for p in (1, 2, 5):
                nodes = [e(3, 3, c, dtype=vd, requires_grad=True) for _ in range(p)]
                out, _ = fb.lagrange_leap(e(3, 3, c, requires_grad=True), nodes, w[:p], e(3, 3, c),
                                          scales=[1.0, 0.5, 2.0, 1.0, 0.25][:p], base=e(3, 3, c))
                torch.autograd.grad(out, nodes, e(3, 3, c))
    fb.surrogate_vjp(e(2, 5, 33), e(2, 5, 33, dtype=bf16), w, out_dtype=bf16)  # P = 10, two launches
    for shape in kh.ALIGNMENT_SHAPES:  # test_alignment_*: the aligned and the offset copies
        for vd in kh.DTYPES:
            for fmt in ("fp32", "bf16", "fp8"):
                fb.euler_cache_step(e(shape), e(shape, dtype=vd), -0.07, velocity_format=fmt, latent_dtype=bf16)
            for target in (e(shape), None):
                fb.lagrange_leap(e(shape), [e(shape, dtype=vd) for _ in range(9)], w[:9], target, base=e(shape))
            fb.surrogate_vjp(e(shape), e(shape), w[:3], out_dtype=vd)


def exercise() -> None:
    """Every launcher call of the kernel tests, benchmarks/kernel_speed.py and benchmarks/gpu_correctness.py."""
    import gpu_correctness
    import kernel_speed

    from helpers import kernels as kh

    _test_calls(kh)
    kernel_speed.BACKENDS = ["triton"]
    ndts = [torch.float32, torch.bfloat16]
    for dims in kernel_speed.SHAPES.values():
        for b in (1, 4, 8):
            empty = lambda shape, dt: torch.empty(shape, dtype=dt)  # noqa: E731
            for _, _, _, impls in kernel_speed.cases(dims, b, "cpu", kernel_speed.OPS, ndts, [1, 3, 5], make=empty):
                impls["triton"]()
    gc = gpu_correctness
    for shape in gc.MODEL_SHAPES.values():
        for spec in gc.SPECS:
            for offset in (0, 1):  # aligned, and at an odd storage offset (no divisibility by 16)
                gc.run_op(spec, gc.make_inputs(spec, shape, "cpu", offset=offset, random=False))
    with contextlib.suppress(Exception):  # the compile check's function, eagerly
        shape = next(iter(gc.MODEL_SHAPES.values()))
        a, u = torch.empty(shape), torch.empty(shape, dtype=torch.bfloat16)
        out, _ = fb.lagrange_leap(a, [u, u], [0.5, -0.25], torch.empty(shape))
        fb.surrogate_vjp(out, None, [2.0, 1.0], out_dtype=torch.bfloat16)
        fb.euler_cache_step(a, u, -0.1, velocity_format="fp8")
    with shadowed_torch_backend():  # the engine step: real values from the reference, launches recorded
        gc.engine_grad_fn("cpu", tiny=False)("torch")


@contextlib.contextmanager
def shadowed_torch_backend():
    """The torch backend computes; every op call is also handed to the Triton launcher (recorded only)."""
    from flowbp_kernels.ops import _euler_cache_step, _lagrange_leap, _surrogate_vjp

    tables = [(_lagrange_leap, "_FORWARD"), (_surrogate_vjp, "_IMPL"), (_euler_cache_step, "_IMPL")]
    saved = [(getattr(mod, t), dict(getattr(mod, t))) for mod, t in tables]

    def shadow(table):
        def call(*args):
            table["triton"](*args)
            return table["torch"](*args)

        return call

    for table, orig in saved:
        table["torch"] = shadow(orig)
    try:
        yield
    finally:
        for table, orig in saved:
            table["torch"] = orig["torch"]


def specialize(fn, args, kwargs, backend):
    """Triton's own binding of a call: (signature, constexprs, attrs, options) and a key to deduplicate."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    key = json.dumps([signature, sorted((str(k), str(v)) for k, v in constexprs.items()),
                      sorted((str(k), str(v)) for k, v in attrs.items()), options.hash()])
    return key, (signature, constexprs, attrs, options)


def compile_one(item) -> dict:
    """Compile one specialization for TARGET and check it (runs in a worker process too)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs, attrs, options = item
    mod, attr = KERNELS[name]
    fn = getattr(mod, attr)
    log = io.StringIO()
    t = time.perf_counter()
    out = {"name": name, "problems": {}}
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(*TARGET), options=options)
    except Exception as exc:  # noqa: BLE001 - every failing specialization is reported, not the first
        out["problems"]["failures"] = f"{name} {signature} {constexprs}: {type(exc).__name__}: {str(exc)[:300]}"
        return out
    out["seconds"] = time.perf_counter() - t
    what = f"{name} {constexprs} num_warps={options['num_warps']}"
    spilled = [int(s) for s in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
    if any(spilled):
        out["problems"]["spills"] = f"{what}: {spilled} bytes"
    ptx = k.asm["ptx"]
    if re.search(r"\bfma\.rn(\.ftz)?\.f32\b", ptx):  # x + h*v contracted: enable_fp_fusion is not off
        out["problems"]["fp32_fma"] = what
    if name == "euler_cache_step" and constexprs.get((fn.arg_names.index("FMT"),)) == 2:
        if "div.rn.f32" not in ptx or re.search(r"\bdiv\.(full|approx)", ptx):  # the fp8 scale's division
            out["problems"]["approx_division"] = what
    return out


def compile_all(items: list, jobs: int) -> dict:
    t0 = time.perf_counter()
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, items, chunksize=4))
    else:
        results = [compile_one(it) for it in items]
    summary = {"compiled": sum("seconds" in r for r in results), "failures": [], "spills": [], "fp32_fma": [],
               "approx_division": [], "compile_seconds": round(time.perf_counter() - t0, 1), "jobs": jobs}
    for r in results:
        for kind, msg in r["problems"].items():
            summary[kind].append(msg)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the summary to this file")
    ap.add_argument("--list", action="store_true", help="only count the specializations, compile nothing")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="compiling processes")
    args = ap.parse_args(argv)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    missing = [n for n in ("create_function_from_signature",) if not hasattr(jit, n)]
    missing += [] if hasattr(jit.JITFunction, "_pack_args") else ["JITFunction._pack_args"]
    if missing:  # the binder is Triton's internal API (present in 3.8 and 3.9)
        print(json.dumps({"triton": triton.__version__, "skipped": f"this Triton lacks {missing}"}))
        return 0

    target = GPUTarget(*TARGET)
    backend = make_backend(target)
    recorders = {}
    for name, (mod, attr) in KERNELS.items():
        recorders[name] = Recorder(name, getattr(mod, attr))
        setattr(mod, attr, recorders[name])
    os.environ["FLOWBP_BACKEND"] = "triton"
    os.environ["TRITON_INTERPRET"] = "1"  # lets the dispatch hand CPU tensors to the launchers (kernels are JIT)
    t0 = time.perf_counter()
    try:
        exercise()
    finally:
        for name, (mod, attr) in KERNELS.items():
            setattr(mod, attr, recorders[name].fn)
        os.environ.pop("TRITON_INTERPRET")
    unique = {}
    calls = 0
    for name, rec in recorders.items():
        for a, kw in rec.calls:
            calls += 1
            key, spec = specialize(rec.fn, a, kw, backend)
            unique.setdefault((name, key), (name, rec.fn, spec))
    summary = {"triton": triton.__version__, "target": list(TARGET), "launches": calls,
               "specializations": len(unique),
               "by_kernel": {n: sum(1 for k in unique if k[0] == n) for n in recorders},
               "record_seconds": round(time.perf_counter() - t0, 1)}
    if not args.list:
        items = [(name, sig, cx, attrs, opts.__dict__) for name, _, (sig, cx, attrs, opts) in unique.values()]
        summary.update(compile_all(items, args.jobs))
    line = json.dumps(summary)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    bad = summary.get("failures") or summary.get("spills") or summary.get("fp32_fma") or summary.get("approx_division")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
