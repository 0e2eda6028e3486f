"""Helpers of the GPU kit (benchmarks/gpu_check.sh): what stage 1 built, stage 2's junit report as JSON
lines, and the final check of the result files with a short table.

    python benchmarks/gpu_kit.py build-report OUT/build.jsonl    # versions, GPU, the extension's contents
    python benchmarks/gpu_kit.py tests-report OUT/tests.xml OUT/tests.jsonl
    python benchmarks/gpu_kit.py summary OUT                     # every expected file there and parseable
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

#: The result files, all in OUT (no folders): the device returns at most 8 files.
RESULT_FILES = ("summary.jsonl", "build.jsonl", "tests.xml", "tests.jsonl", "correctness.jsonl", "speed.jsonl",
                "train_step.jsonl", "log.txt")
#: The packages whose versions decide what runs (the carried wheels and the machine's own stack).
PACKAGES = ("torch", "triton", "numpy", "diffusers", "transformers", "peft", "accelerate", "safetensors",
            "tokenizers", "huggingface_hub", "open_clip_torch", "torchvision", "timm", "pytest", "pytest-timeout",
            "pytest-xdist", "httpx", "regex")


def _append(path: str, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _where(name: str) -> str | None:
    import importlib.util

    spec = importlib.util.find_spec(name.replace("-", "_").replace("open_clip_torch", "open_clip"))
    return str(Path(spec.origin).parent) if spec and spec.origin else None


def build_report(path: str) -> int:
    """One line per fact: versions (and where each package is imported from), the GPU, the extension."""
    _append(path, {"what": "python", "version": sys.version.split()[0], "executable": sys.executable})
    for name in PACKAGES:
        _append(path, {"what": "package", "name": name, "version": _version(name), "path": _where(name)})
    import torch

    gpu = {"what": "gpu", "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu.update(name=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                   memory_bytes=p.total_memory, l2_bytes=getattr(p, "L2_cache_size", None))
    _append(path, gpu)
    from flowbp_kernels import _ext, backends

    status = _ext.status()
    so = sorted(str(p) for p in Path(_ext.__file__).parent.glob("_C*.so"))
    ext = {"what": "extension", "status": status, "files": so, "backends": backends()}
    if status["ok"]:
        ext["kernels"] = {op: {k: torch._C._dispatch_has_kernel_for_dispatch_key(f"flowbp::{op}", k)
                               for k in ("CPU", "CUDA")} for op in _ext.OPS}
    cuobjdump = os.environ.get("CUOBJDUMP") or "cuobjdump"
    for flag in ("--list-elf", "--list-ptx"):
        try:
            r = subprocess.run([cuobjdump, flag, *so], capture_output=True, text=True, timeout=60)
            ext[flag.strip("-")] = sorted({w for w in r.stdout.split() if "sm_" in w})
        except (OSError, subprocess.TimeoutExpired) as exc:
            ext[flag.strip("-")] = f"unavailable: {exc}"
    _append(path, ext)
    print(json.dumps({k: ext[k] for k in ext if k != "backends"}, default=str)[:2000])
    return 0 if status["ok"] else 1


def tests_report(xml_path: str, out: str) -> int:
    """Counts, the slowest tests and every failure of the junit report, as JSON lines."""
    if not Path(xml_path).is_file():
        _append(out, {"what": "junit", "error": f"{xml_path} missing (pytest did not finish?)"})
        return 1
    root = ET.parse(xml_path).getroot()
    cases = list(root.iter("testcase"))
    outcome = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    rows = []
    for c in cases:
        kind = next((k for k in ("failure", "error", "skipped") if c.find(k) is not None), "passed")
        outcome[{"failure": "failed"}.get(kind, kind)] += 1
        rows.append((c, kind))
    _append(out, {"what": "counts", **outcome, "tests": len(cases)})
    for c, kind in rows:
        if kind in ("failure", "error"):
            el = c.find(kind)
            _append(out, {"what": kind, "test": f"{c.get('classname')}::{c.get('name')}", "time_s": c.get("time"),
                          "message": (el.get("message") or "")[:500], "text": (el.text or "")[-1500:]})
    slow = sorted(rows, key=lambda r: -float(r[0].get("time") or 0))[:10]
    _append(out, {"what": "slowest", "tests": [[f"{c.get('classname')}::{c.get('name')}", c.get("time")]
                                               for c, _ in slow]})
    print(json.dumps({"what": "counts", **outcome}))
    return 0 if outcome["failed"] == outcome["error"] == 0 else 1


def summary(out_dir: str) -> int:
    """Every result file present, every JSON line parseable; a table of the stages."""
    out = Path(out_dir)
    bad = []
    for name in RESULT_FILES:
        f = out / name
        if not f.is_file():
            bad.append(f"{name}: missing")
            continue
        if name.endswith(".jsonl"):
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
            for i, ln in enumerate(lines):
                try:
                    json.loads(ln)
                except json.JSONDecodeError as exc:
                    bad.append(f"{name}:{i + 1}: {exc}")
            if not lines:
                bad.append(f"{name}: empty")
    extra = [p.name for p in out.iterdir() if p.name not in RESULT_FILES]
    if extra:
        bad.append(f"unexpected files (only {len(RESULT_FILES)} come back): {extra}")
    print(f"{'stage':12} {'rc':>4} {'seconds':>8} {'limit':>6}  result")
    if (out / "summary.jsonl").is_file():
        for ln in (out / "summary.jsonl").read_text().splitlines():
            r = json.loads(ln)
            if "stage" in r:
                print(f"{r['stage']:12} {r['rc']:>4} {r['seconds']:>8} {r['limit_s']:>6}  {r.get('note', '')}")
    for b in bad:
        print(f"result files: {b}")
    print("result files: all present and parseable" if not bad else f"result files: {len(bad)} problems")
    if (out / "summary.jsonl").is_file():
        _append(str(out / "summary.jsonl"), {"what": "result files", "ok": not bad, "problems": bad})
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    cmd, *rest = argv
    return {"build-report": build_report, "tests-report": tests_report, "summary": summary}[cmd](*rest)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
