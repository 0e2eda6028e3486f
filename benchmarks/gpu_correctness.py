"""Correctness of the fused ops at model shapes on one device (the GPU kit's stage 3; CPU in its dry run).

Per op, backend and shape (FLUX.1 1024 px, SD3.5-M 1024 px, FLUX.2-Klein 1024 px, batch 1): the error
against a float64 truth within the kernel tests' criterion (tests/helpers/kernels.py: ERR_FACTOR times
the torch reference's error plus ATOL), exact pins and exact cache contents, inputs unchanged (bitwise,
base and more than 8 nodes included), a second call bitwise equal (run-to-run determinism), the same
values from inputs at an odd storage offset (the unaligned path), ``torch.library.opcheck`` of the
registered ops, ``torch.compile(fullgraph=True)`` as the first op call of the process, and one engine
step (rollout + reward_backprop) against the torch reference. Every check is one JSON line (``--jsonl``);
the exit status is 1 when any check failed.

    python benchmarks/gpu_correctness.py --jsonl OUT.jsonl            # on a GPU: cuda and triton backends
    python benchmarks/gpu_correctness.py --dry-run --jsonl OUT.jsonl  # CPU, tiny shapes: cpu, triton, torch
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # _common; the kernel tests' helpers.kernels

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the dry run interprets Triton, as the CPU tests do

#: Batch-1 latents at 1024 px: FLUX.1 (4096 tokens x 64), SD3.5-M (16 x 128 x 128), FLUX.2-Klein (4096 x 128).
MODEL_SHAPES = {"flux1-1024": (1, 4096, 64), "sd35m-1024": (1, 16, 128, 128), "flux2klein-1024": (1, 4096, 128)}
#: The dry run's stand-ins: the same ranks, sizes a CPU (and the Triton interpreter) does in a moment.
TINY_SHAPES = {"flux1-tiny": (1, 16, 64), "sd35m-tiny": (1, 4, 8, 16), "flux2klein-tiny": (1, 8, 136)}
WEIGHTS = [0.7, -1.3, 0.25, 2.0, -0.5, 1.1, 0.9, -0.3, 0.6, 1.7]
#: Engine step vs the torch reference: the kernels do the reference's operations, except that the residual
#: (inside the similarity weight) is summed in another order, a few fp32 ulps of one scalar factor.
ENGINE_REL_TOL = 1e-4


@dataclass(frozen=True)
class Spec:
    """One op configuration: ``op`` and its parameters (node/velocity dtype, P, format, ...)."""

    op: str
    params: tuple = field(default_factory=tuple)

    @property
    def p(self) -> dict:
        return dict(self.params)

    def name(self) -> str:
        return f"{self.op}(" + ", ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in self.params) + ")"


def _spec(op: str, **kw) -> Spec:
    return Spec(op, tuple(sorted(kw.items())))


bf16, f32 = torch.bfloat16, torch.float32
SPECS = (
    [_spec("euler_cache_step", fmt=f, v=bf16, latent=bf16) for f in ("fp32", "bf16", "fp8")]
    + [_spec("euler_cache_step", fmt="fp8", v=f32, latent=f32)]
    + [_spec("lagrange_leap", p=p, nodes=bf16, pinned=pin) for p in (1, 3, 9) for pin in (True, False)]
    + [_spec("lagrange_leap", p=3, nodes=f32, pinned=True)]
    + [_spec("surrogate_vjp", p=3, out=bf16, adjoint=True), _spec("surrogate_vjp", p=10, out=f32, adjoint=False)]
)


def _randn(shape, dtype, device, seed, offset=0, random=True):
    """Standard normal values (scaled by 3 so that fp8 uses its range), at an element ``offset`` of storage
    (``random=False``: uninitialised, for tests/kernels/ops/triton_aot.py, which only records the launches)."""
    n = 1
    for d in shape:
        n *= d
    out = torch.empty(n + offset, dtype=dtype, device=device)[offset:].view(shape)
    if random:
        g = torch.Generator().manual_seed(seed)
        out.copy_((torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype))
    return out


def make_inputs(spec: Spec, shape, device, seed=0, offset=0, random=True) -> dict:
    p = spec.p
    r = lambda dt, k: _randn(shape, dt, device, seed + k, offset, random)  # noqa: E731
    if spec.op == "euler_cache_step":
        return {"x": r(f32, 0), "v": r(p["v"], 1)}
    if spec.op == "lagrange_leap":
        return {"anchor": r(f32, 0), "nodes": [r(p["nodes"], 10 + m) for m in range(p["p"])],
                "target": r(f32, 2) if p["pinned"] else None, "base": r(f32, 3)}
    return {"upstream": r(f32, 0), "adjoint": r(f32, 1) if p["adjoint"] else None}


def run_op(spec: Spec, inp: dict, impl=None) -> list[torch.Tensor]:
    """The op through the public API (``impl``: the reference module instead); outputs without Nones."""
    import flowbp_kernels as fb
    from flowbp_kernels.ops import reference as ref

    p = spec.p
    if spec.op == "euler_cache_step":
        fn = ref.euler_cache_step_ref if impl == "ref" else fb.euler_cache_step
        outs = fn(inp["x"], inp["v"], -0.0731, velocity_format=p["fmt"], latent_dtype=p["latent"])
    elif spec.op == "lagrange_leap":
        w = WEIGHTS[: p["p"]]
        if impl == "ref":
            outs = ref.lagrange_leap_ref(inp["anchor"], inp["nodes"], w, inp["target"], inp["base"])
        else:
            outs = fb.lagrange_leap(inp["anchor"], inp["nodes"], w, inp["target"], base=inp["base"])
    else:
        cs = WEIGHTS[: p["p"]]
        fn = ref.surrogate_vjp_ref if impl == "ref" else (lambda u, a, c, out_dtype: fb.surrogate_vjp(
            u, a, c, out_dtype=out_dtype))
        outs = [fn(inp["upstream"], inp["adjoint"], cs, out_dtype=p["out"])]
    return [o for o in outs if o is not None]


def _as64(inp: dict) -> dict:
    return {k: (None if v is None else [t.double().cpu() for t in v] if isinstance(v, list) else v.double().cpu())
            for k, v in inp.items()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().cpu().contiguous().view(view)


def bitwise_equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
                                    for x, y in zip(a, b))


def value_checks(spec: Spec, inp: dict, outs: list) -> list[dict]:
    """Each output against the float64 truth (the kernel tests' criterion), or bitwise where exact."""
    from helpers.kernels import ATOL, ERR_FACTOR, max_err

    refs = run_op(spec, inp, "ref")
    p = spec.p
    results = []
    if spec.op == "euler_cache_step":
        truth = inp["x"].double().cpu() + (-0.0731) * inp["v"].double().cpu()
        e, er = max_err(outs[0].cpu(), truth), max_err(refs[0].cpu(), truth)
        results.append({"what": "x_next", "max_err": e, "bound": ERR_FACTOR * er + ATOL[outs[0].dtype]})
        results.append({"what": "x_cached", "bitwise": bitwise_equal([outs[1]], [refs[1]])})
        if p["fmt"] != "fp8":
            results.append({"what": f"{p['fmt']} data", "bitwise": bitwise_equal([outs[2]], [refs[2]])})
        else:  # the definition is RN(amax / 448) and RN(v / scale): bitwise on every backend
            results.append({"what": "fp8 scale", "bitwise": bitwise_equal([outs[3]], [refs[3]])})
            results.append({"what": "fp8 data", "bitwise": bitwise_equal([outs[2]], [refs[2]])})
    elif spec.op == "lagrange_leap":
        t_out, t_res = run_op(spec, _as64(inp), "ref") + ([None] if not p["pinned"] else [])
        if p["pinned"]:
            results.append({"what": "pinned out == target", "bitwise": bitwise_equal([outs[0]], [inp["target"]])})
            e, er = max_err(outs[1].cpu(), t_res), max_err(refs[1].cpu(), t_res)
            results.append({"what": "residual", "max_err": e, "bound": ERR_FACTOR * er + ATOL[outs[1].dtype]})
        else:
            e, er = max_err(outs[0].cpu(), t_out), max_err(refs[0].cpu(), t_out)
            results.append({"what": "xhat", "max_err": e, "bound": ERR_FACTOR * er + ATOL[outs[0].dtype]})
    else:
        truth = run_op(spec, _as64(inp), "ref")[0]
        e, er = max_err(outs[0].cpu(), truth), max_err(refs[0].cpu(), truth)
        results.append({"what": "cotangents", "max_err": e, "bound": ERR_FACTOR * er + ATOL[outs[0].dtype]})
    for r in results:
        r["ok"] = bool(r["bitwise"]) if "bitwise" in r else bool(r["max_err"] <= r["bound"])
    return results


@contextlib.contextmanager
def backend_env(name: str):
    old = os.environ.get("FLOWBP_BACKEND")
    os.environ["FLOWBP_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLOWBP_BACKEND", None)
        else:
            os.environ["FLOWBP_BACKEND"] = old


def _flat_inputs(inp: dict) -> list[torch.Tensor]:
    out = []
    for v in inp.values():
        out += v if isinstance(v, list) else ([] if v is None else [v])
    return out


def op_checks(spec: Spec, shape_name: str, shape, device: str, backend: str) -> list[dict]:
    """Values, no mutation, determinism and the unaligned path of one op configuration."""
    inp = make_inputs(spec, shape, device)
    before = [t.clone() for t in _flat_inputs(inp)]
    with backend_env(backend):
        outs = run_op(spec, inp)
        again = run_op(spec, inp)
        shifted = run_op(spec, make_inputs(spec, shape, device, offset=1))
    rows = [{"check": "value", **r} for r in value_checks(spec, inp, outs)]
    rows.append({"check": "inputs unchanged", "ok": bitwise_equal(before, _flat_inputs(inp))})
    rows.append({"check": "run-to-run bitwise", "ok": bitwise_equal(outs, again)})
    if backend == "triton" and device == "cuda" and spec.op == "lagrange_leap" and spec.p["pinned"]:
        # compiled Triton may sum a block's residual in another order when the alignment changes its layout
        rows.append({"check": "odd storage offset gives the same bits (residual: the criterion)",
                     "ok": bitwise_equal(outs[:1], shifted[:1])})
        rows += [{"check": "odd storage offset: residual", **r} for r in value_checks(spec, inp, shifted)
                 if r["what"] == "residual"]
    else:
        rows.append({"check": "odd storage offset gives the same bits", "ok": bitwise_equal(outs, shifted)})
    return [{"op": spec.op, "config": spec.name(), "shape": shape_name, "backend": backend, **r} for r in rows]


def opcheck_samples(device: str) -> list:
    """Samples of every registered op for ``torch.library.opcheck`` (P = 9 with a base included)."""
    from helpers.kernels import make

    x, t = make((2, 3, 5), f32, device, 0), make((2, 3, 5), f32, device, 2)
    v = make((2, 3, 5), bf16, device, 1)
    nine = [make((2, 3, 5), (bf16, f32, torch.float16)[m % 3], device, 10 + m) for m in range(9)]
    ops = torch.ops.flowbp
    return [
        (ops.euler_cache_step.default, (x, v, -0.1, 0, f32)),
        (ops.euler_cache_step.default, (x, v, -0.1, 1, bf16)),
        (ops.euler_cache_step.default, (x, v, -0.1, 2, f32)),
        (ops.euler_cache_step.default, (x, x, -0.1, 0, f32, False, False)),
        (ops.lagrange_leap_fwd.default, (x, [v, x], [0.5, -1.0], t, None)),
        (ops.lagrange_leap_fwd.default, (x, [v], [0.5], None, t)),
        (ops.lagrange_leap_fwd.default, (x, nine, WEIGHTS[:9], t, v)),
        (ops.lagrange_leap_fwd.default, (x, nine, WEIGHTS[:9], None, t)),
        (ops.surrogate_vjp.default, (x, t, [0.5, 2.0], bf16)),
        (ops.surrogate_vjp.default, (x, None, WEIGHTS, f32)),
    ]


def compile_check(device: str, backends: list[str], shape) -> list[dict]:
    """torch.compile(fullgraph=True) of the public ops as the first op call of this process, per backend:
    the compiled function must give the eager bits (the ops are opaque to the compiler)."""
    rows = []
    cbackend = "inductor" if device == "cuda" else "aot_eager"  # inductor on CPU would compile C++ for minutes
    inp = {k: _randn(shape, dt, device, s) for k, dt, s in (("a", f32, 0), ("u", bf16, 1), ("t", f32, 2))}

    def f(a, u, t):
        import flowbp_kernels as fb

        out, res = fb.lagrange_leap(a, [u, u], [0.5, -0.25], t)
        g = fb.surrogate_vjp(out, None, [2.0, 1.0], out_dtype=bf16)
        xn, xc, d, s = fb.euler_cache_step(a, u, -0.1, velocity_format="fp8")
        return out, res, g, xn, xc, d, s

    for backend in backends:
        torch._dynamo.reset()
        with backend_env(backend):
            try:
                got = torch.compile(f, backend=cbackend, fullgraph=True)(inp["a"], inp["u"], inp["t"])
                ok = bitwise_equal(list(got), list(f(inp["a"], inp["u"], inp["t"])))
                rows.append({"check": f"torch.compile(fullgraph, {cbackend}) first call == eager", "ok": ok})
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                rows.append({"check": f"torch.compile(fullgraph, {cbackend}) first call == eager", "ok": False,
                             "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
        rows[-1]["backend"] = backend
    return rows


def engine_grad_fn(device: str, tiny: bool):
    """``grad(backend)``: the parameter gradient of one FlowBP-Lagrange step (cached rollout with a bf16
    velocity cache, streaming executor) on a small random DiT, with the ops on ``backend``."""
    from _common import TinyDiT

    import flowbp_kernels as fb

    n = 8 if tiny else 25
    sig = fb.flow_sigmas(n, shift=3.0)
    net = TinyDiT(tokens=16 if tiny else 256, channels=64, width=64 if tiny else 256, depth=2).to(device)
    net.sigmas = sig
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, net.tokens, net.channels, generator=g).to(device)
    w = torch.randn(net.tokens * net.channels, generator=g).to(device)
    reward = lambda x: torch.tanh(x.reshape(x.shape[0], -1) @ w / 64)  # noqa: E731
    method = fb.get_method("flowbp-lagrange", tau=1e-9)  # the weight sees the residuals
    plan = method.plan(n, torch.Generator().manual_seed(7))

    def grad(backend):
        with backend_env(backend), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            ro = fb.rollout(net, x0, sig, cache="bf16")
            net.zero_grad(set_to_none=True)
            fb.reward_backprop(method, net, ro, reward, plan=plan, executor="streaming")
        return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    return grad


def engine_checks(device: str, backends: list[str], tiny: bool) -> list[dict]:
    """The engine step's gradient with each kernel backend against the torch reference's (within
    ENGINE_REL_TOL), and whether a second step gives the same bits (recorded)."""
    grad = engine_grad_fn(device, tiny)
    ref = grad("torch")
    rows = []
    for backend in backends:
        got = grad(backend)
        rel = float((got - ref).norm() / ref.norm())
        rows.append({"check": "engine step gradient vs torch reference", "backend": backend, "rel_err": rel,
                     "bound": ENGINE_REL_TOL, "ok": rel <= ENGINE_REL_TOL,
                     "repeatable_bitwise": bool(torch.equal(got, grad(backend)))})
    return rows


def e4m3_facts(device: str) -> dict:
    """What this torch's e4m3 cast does above 464 (saturates or NaN): the helpers saturate, as recent torch."""
    x = torch.tensor([500.0, float("inf"), float("nan")], device=device)
    return {"check": "torch e4m3fn cast of [500, inf, nan] (bits)", "ok": True,
            "bits": x.to(torch.float8_e4m3fn).view(torch.uint8).tolist()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, backends cpu/triton/torch")
    ap.add_argument("--jsonl", default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new check after this many seconds")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    from _common import append_jsonl, metadata

    import flowbp_kernels as fb

    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    avail = fb.backends()
    wanted = ["cuda", "triton"] if device == "cuda" else ["cpu", "triton", "torch"]
    backends = [b for b in wanted if avail[b].startswith("available")]
    shapes = TINY_SHAPES if device == "cpu" else MODEL_SHAPES
    meta = {"stage": "correctness", **metadata(), "backends_available": avail}
    failures = 0

    def emit(row: dict) -> None:
        nonlocal failures
        row = {**row, **meta, "t_s": round(time.perf_counter() - t0, 2)}
        failures += 0 if row.get("ok", True) else 1
        append_jsonl(args.jsonl, row)
        flag = "ok  " if row.get("ok", True) else "FAIL"
        detail = {k: row[k] for k in ("max_err", "bound", "rel_err", "error", "bits") if k in row}
        print(f"{flag} {row.get('backend', '-'):7} {row.get('shape', '-'):16} {row.get('config', '')[:48]:48} "
              f"{row['check']}{': ' + row['what'] if 'what' in row else ''} {detail or ''}", flush=True)

    def guarded(fn, what: str):
        try:
            for r in fn():
                emit(r)
        except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check; the others still run
            emit({"check": what, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-2000:]})

    # first: torch.compile as the very first op call of the process; then the short checks, then the op
    # configurations at model shapes, the bulk, while the time budget lasts
    guarded(lambda: compile_check(device, backends, next(iter(shapes.values()))), "torch.compile")
    emit(e4m3_facts(device))
    if "cuda" in backends or "cpu" in backends:
        def opchecks():
            for i, (op, a) in enumerate(opcheck_samples(device)):
                torch.library.opcheck(op, a)
                yield {"check": f"opcheck sample {i}: {op}", "backend": device, "ok": True}
        guarded(opchecks, "opcheck")
    guarded(lambda: engine_checks(device, [b for b in backends if b != "torch"], device == "cpu"), "engine step")
    for shape_name, shape in shapes.items():
        for spec in SPECS:
            for backend in backends:
                if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
                    emit({"check": "skipped: time budget spent", "op": spec.op, "config": spec.name(),
                          "shape": shape_name, "backend": backend})
                    continue
                guarded(lambda s=spec, b=backend, n=shape_name, sh=shape: op_checks(s, n, sh, device, b),
                        f"{spec.name()} on {backend}")
    print(f"# correctness: {failures} failed checks ({time.perf_counter() - t0:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
