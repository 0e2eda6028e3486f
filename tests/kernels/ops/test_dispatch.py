"""Dispatch, the extension loader and the registered ops: import without CUDA, FLOWBP_BACKEND, backends(),
the loader's remembered reasons, opcheck (schema, fake tensors, torch.compile tracing) on the ops."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

import flowbp_kernels as fb
from flowbp_kernels import _ext
from flowbp_kernels.ops import _dispatch

from helpers.kernels import backend_params, make

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
requires_ext = pytest.mark.skipif(not _ext.load(), reason=f"compiled extension unavailable: {_ext.status()['error']}")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=REPO, timeout=120)


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, flowbp_kernels as fb\n"
        "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\n"
        "x = torch.randn(2, 3)\n"
        "fb.lagrange_leap(x, [x], [0.5], x)\n"
        "fb.backends()\n"
        "assert not torch.cuda.is_initialized(), 'a CPU op or backends() initialised CUDA'\n"
        "print('ok')\n"
    )
    r = _run(code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_backends_reports_every_backend_with_a_reason():
    b = fb.backends()
    assert set(b) == {"torch", "cpu", "cuda", "triton"}
    for name, msg in b.items():
        assert msg.startswith(("available", "unavailable: ")), (name, msg)
        if msg.startswith("unavailable"):
            assert len(msg) > len("unavailable: "), f"{name} gives no reason"


def test_forced_backend_errors(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("FLOWBP_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FLOWBP_BACKEND"):
        fb.surrogate_vjp(x, None, [1.0])
    monkeypatch.setenv("FLOWBP_BACKEND", "cuda")
    with pytest.raises(_dispatch.BackendUnavailableError, match="cuda"):
        fb.surrogate_vjp(x, None, [1.0])
    monkeypatch.setenv("FLOWBP_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(_dispatch.BackendUnavailableError, match="triton"):
        fb.surrogate_vjp(x, None, [1.0])


@requires_ext
def test_forced_backend_raises_for_a_dtype_it_does_not_take(monkeypatch):
    monkeypatch.setenv("FLOWBP_BACKEND", "cpu")
    x = torch.randn(2, 3)
    with pytest.raises(_dispatch.BackendUnavailableError, match="float8"):
        fb.surrogate_vjp(x.to(torch.float8_e4m3fn), None, [1.0])


def test_automatic_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.delenv("FLOWBP_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_logged", set())
    x = torch.randn(2, 3).to(torch.float8_e4m3fn)  # no kernel takes fp8 input: the reference serves it
    with caplog.at_level(logging.INFO, logger="flowbp_kernels"):
        for _ in range(3):
            assert _dispatch.choose_backend("surrogate_vjp", x, lambda b: "dtype not taken") == "torch"
    assert sum("torch reference" in r.getMessage() for r in caplog.records) == 1


@requires_ext
def test_automatic_choice_on_cpu_is_the_compiled_kernel(monkeypatch):
    monkeypatch.delenv("FLOWBP_BACKEND", raising=False)
    assert _dispatch.choose_backend("lagrange_leap", torch.randn(2)) == "cpu"


def test_loader_remembers_why_when_jit_is_disabled():
    code = (
        "import flowbp_kernels._ext as e\n"
        "e._prebuilt = lambda: None\n"
        "assert not e.load()\n"
        "st = e.status()\n"
        "assert 'FLOWBP_JIT=0' in st['error'], st\n"
        "import flowbp_kernels as fb, torch\n"
        "assert 'FLOWBP_JIT=0' in fb.backends()['cpu']\n"
        "x = torch.randn(2, 3)\n"
        "out, res = fb.lagrange_leap(x, [x], [0.5], x)\n"
        "assert torch.equal(out, x)\n"
        "print('ok')\n"
    )
    r = _run(code, FLOWBP_JIT="0", FLOWBP_BACKEND="auto")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_env_module_prints_versions_and_backends():
    r = _run("import runpy; runpy.run_module('flowbp_kernels.env', run_name='__main__')")
    assert r.returncode == 0, r.stderr[-2000:]
    for word in ("torch", "flowbp_kernels", "backend cpu", "backend triton"):
        assert word in r.stdout, r.stdout


def _op_samples(device="cpu"):
    x = make((2, 3, 5), torch.float32, device, 0)
    v = make((2, 3, 5), torch.bfloat16, device, 1)
    t = make((2, 3, 5), torch.float32, device, 2)
    nine = [make((2, 3, 5), (torch.bfloat16, torch.float32, torch.float16)[m % 3], device, 10 + m) for m in range(9)]
    w9 = [0.5 - 0.25 * m for m in range(9)]
    ops = torch.ops.flowbp
    return [
        (ops.euler_cache_step.default, (x, v, -0.1, 0, torch.float32)),
        (ops.euler_cache_step.default, (x, v, -0.1, 1, torch.bfloat16)),
        (ops.euler_cache_step.default, (x, v, -0.1, 2, torch.float32)),
        (ops.euler_cache_step.default, (x, x, -0.1, 0, torch.float32, False, False)),
        (ops.lagrange_leap_fwd.default, (x, [v, x], [0.5, -1.0], t, None)),
        (ops.lagrange_leap_fwd.default, (x, [v], [0.5], None, t)),
        # more nodes than one CUDA launch takes, with a base: the launches chain through the output
        (ops.lagrange_leap_fwd.default, (x, nine, w9, t, v)),
        (ops.lagrange_leap_fwd.default, (x, nine, w9, None, t)),
        (ops.surrogate_vjp.default, (x, t, [0.5, 2.0], torch.bfloat16)),
        (ops.surrogate_vjp.default, (x, None, [1.0], torch.float32)),
    ]


_N_SAMPLES = 10
requires_cuda_ext = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.load() and _ext.status()["cuda"]), reason="requires CUDA kernels and a GPU"
)


@requires_ext
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda_ext)])
@pytest.mark.parametrize("case", range(_N_SAMPLES))
def test_opcheck_registered_ops(case, device):
    samples = _op_samples(device)
    assert len(samples) == _N_SAMPLES
    op, args = samples[case]
    torch.library.opcheck(op, args)


def test_fullgraph_compile_as_the_first_op_call_of_a_process():
    """torch.compile(fullgraph=True) over the public ops as the first call of a fresh process (the loader
    runs at trace time, not traced), on the automatic backend, then the Triton launchers (a custom op under
    compile; interpreted here) and the torch reference; each compiled result equals the eager one."""
    code = (
        "import os, torch, flowbp_kernels as fb\n"
        "def f(a, u, t):\n"
        "    out, res = fb.lagrange_leap(a, [u, u], [0.5, -0.25], t)\n"
        "    g = fb.surrogate_vjp(out, None, [2.0, 1.0], out_dtype=torch.bfloat16)\n"
        "    xn, xc, d, s = fb.euler_cache_step(a, u, -0.1, velocity_format='fp8')\n"
        "    return out, res, g, xn, d.view(torch.uint8), s\n"
        "g = torch.Generator().manual_seed(0)\n"
        "a, t = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)\n"
        "u = torch.randn(2, 3, 16, generator=g).bfloat16()\n"
        "for backend in ('auto', 'triton', 'torch'):\n"
        "    os.environ['FLOWBP_BACKEND'] = backend\n"
        "    torch._dynamo.reset()\n"
        "    got = torch.compile(f, backend='aot_eager', fullgraph=True)(a, u, t)\n"
        "    want = f(a, u, t)\n"
        "    assert all(torch.equal(x, y) for x, y in zip(got, want)), backend\n"
        "    print('compiled', backend)\n"
    )
    r = _run(code, TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["compiled", "auto", "compiled", "triton", "compiled", "torch"], r.stdout


@requires_ext
def test_ops_trace_under_torch_compile():
    x = torch.randn(2, 3, 8)
    u = torch.randn(2, 3, 8).bfloat16()

    def f(x, u):
        out, res = torch.ops.flowbp.lagrange_leap_fwd(x, [u], [0.5], None, None)
        return torch.ops.flowbp.surrogate_vjp(out, None, [2.0], torch.float32)

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, u)
    torch.testing.assert_close(got, f(x, u), rtol=0, atol=0)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id == "cpu"])
def test_compiled_kernel_checks_name_the_op(backend):
    if not _ext.load():
        pytest.skip("no extension")
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="flowbp::lagrange_leap_fwd"):
        torch.ops.flowbp.lagrange_leap_fwd(x, [x[:, :2]], [1.0], None, None)
    with pytest.raises(RuntimeError, match="flowbp::euler_cache_step"):
        torch.ops.flowbp.euler_cache_step(x, x, 1.0, 7, torch.float32)
    with pytest.raises(RuntimeError, match="flowbp::surrogate_vjp"):
        torch.ops.flowbp.surrogate_vjp(x, x[:1], [1.0], torch.float32)
