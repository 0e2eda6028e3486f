"""The miniature's main job driven directly (``flowbp-mini align``), and the report it writes.

Outputs in ``output_dir``: ``grid_before_after.png`` (every prompt x 8 fixed seeds, base on the left,
aligned on the right, same noise), ``grid_before.png``/``grid_after.png``, ``curves.png`` (training
reward per step; evaluation reward and held-out judge every ``eval_every`` steps), ``summary.json``
(settings, before/after metrics, timings) and ``pytorch_lora_weights.safetensors``.
:func:`report_run` (``flowbp-mini report OUTPUT_DIR``) writes the same report for a finished
``flowbp-train recipes/mini/*.yaml`` run from its files alone: ``config.yaml``, ``logs/train_log.jsonl``,
the ``checkpoint-<step>/`` LoRAs (the held-out curve) and the final LoRA (the after grid).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from flowbp_train.mini.report import plot_curves, save_before_after, save_grid, write_summary


def write_report(output_dir: str | Path, *, before: torch.Tensor, after: torch.Tensor, per_prompt: int,
                 history: list[dict], summary: dict) -> dict[str, str]:
    """Write grids, curves and summary into ``output_dir``; returns the paths by name."""
    out = Path(output_dir)
    paths = {
        "grid_before_after": save_before_after(before, after, out / "grid_before_after.png", per_prompt),
        "grid_before": save_grid(before, out / "grid_before.png", per_prompt),
        "grid_after": save_grid(after, out / "grid_after.png", per_prompt),
        "curves": plot_curves(history, out / "curves.png", title=summary.get("title", "")),
    }
    for extra in (out / "grid_before_after.before.png", out / "grid_before_after.after.png"):
        extra.unlink(missing_ok=True)
    paths = {k: str(v) for k, v in paths.items()}
    paths["summary"] = str(write_summary(out / "summary.json", {**summary, "files": paths, "history": history}))
    return paths


def run_main_job(output_dir: str | Path, *, method: str = "flowbp-lagrange", steps: int = 60, seed: int = 0,
                 threads: int = 1, batch_size: int = 32, eval_every: int = 10, log=print) -> dict:
    """Align the base miniature with ``method`` for ``steps`` LoRA steps and write the report."""
    from flowbp_train.mini.align import AlignConfig, align
    from flowbp_train.mini.lora import save_lora
    from flowbp_train.models.mini import MiniAdapter
    from flowbp_train.rewards.mini import DigitJudge, DigitReward

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    adapter = MiniAdapter.from_pretrained("mini")
    reward, judge = DigitReward(), DigitJudge()
    cfg = AlignConfig(method=method, steps=steps, seed=seed, batch_size=batch_size,
                      eval_every=min(eval_every, steps))
    samples: dict[int, torch.Tensor] = {}
    res = align(adapter, reward, judge, cfg, log=log, on_eval=lambda s, m, x: samples.__setitem__(s, x))
    lora_path = save_lora(adapter, output_dir)
    last = max(samples)
    summary = {
        "title": f"miniature, {method}, {steps} steps, batch {batch_size}, seed {seed}",
        "method": method, "method_options": res["method_options"], "config": res["config"],
        "before": res["evals"][0], "after": res["evals"][last],
        "step_time_median_s": res["step_time_median_s"], "total_seconds": time.perf_counter() - t0,
        "lora": str(lora_path),
    }
    paths = write_report(output_dir, before=samples[0], after=samples[last], per_prompt=cfg.eval_per_prompt,
                         history=res["history"], summary=summary)
    log(f"before: reward {summary['before']['reward']:.3f} judge {summary['before']['judge']:.3f}; "
        f"after: reward {summary['after']['reward']:.3f} judge {summary['after']['judge']:.3f}; "
        f"{summary['total_seconds']:.0f}s; grid {paths['grid_before_after']}")
    return summary


def report_run(output_dir: str | Path, *, per_prompt: int = 8, log=print) -> dict:
    """The report of a finished trainer run of the miniature (see the module docstring)."""
    import json as _json

    import yaml

    from flowbp_train.mini.lora import LORA_FILE, load_lora
    from flowbp_train.mini.report import evaluate
    from flowbp_train.models.mini import MiniAdapter
    from flowbp_train.rewards.mini import DigitJudge, DigitReward

    out = Path(output_dir)
    cfg_path, final = out / "config.yaml", out / LORA_FILE
    if not cfg_path.is_file() or not final.is_file():
        raise FileNotFoundError(f"output_dir: {out} holds no finished run (config.yaml and {LORA_FILE} expected)")
    cfg = yaml.safe_load(cfg_path.read_text())
    if cfg.get("family") != "mini":
        raise ValueError(f"output_dir: {out} is a {cfg.get('family')!r} run, not a miniature one")
    t0 = time.perf_counter()
    reward, judge = DigitReward(), DigitJudge()
    n = int(cfg.get("sample_steps") or cfg.get("num_steps") or 10)

    def scored(lora: Path | None):
        ad = MiniAdapter.from_pretrained(cfg.get("pretrained_model_name_or_path") or "mini",
                                         guidance_scale=cfg.get("guidance_scale"))
        if lora is not None:
            load_lora(ad.transformer, lora, alpha=cfg.get("lora_alpha"))
        return evaluate(ad, reward, judge, per_prompt=per_prompt, num_steps=n)

    history = []
    log_file = out / cfg.get("logging_dir", "logs") / "train_log.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            rec = _json.loads(line)
            if rec.get("reward") is not None:
                history.append({"step": rec["step"], "train_reward": rec["reward"]})
    before_m, before = scored(None)
    history.append({"step": 0, "eval_reward": before_m["reward"], "eval_judge": before_m["judge"]})
    ckpts = sorted((p for p in out.glob("checkpoint-*") if (p / LORA_FILE).is_file()),
                   key=lambda p: int(p.name.split("-")[1]))
    for c in ckpts:
        m, _ = scored(c / LORA_FILE)
        history.append({"step": int(c.name.split("-")[1]), "eval_reward": m["reward"], "eval_judge": m["judge"]})
    after_m, after = scored(final)
    history.sort(key=lambda h: h["step"])
    summary = {"title": f"miniature, {cfg.get('method')}, {cfg.get('max_train_steps')} steps (flowbp-train)",
               "method": cfg.get("method"), "config": cfg, "before": before_m, "after": after_m,
               "report_seconds": time.perf_counter() - t0, "lora": str(final)}
    paths = write_report(out, before=before, after=after, per_prompt=per_prompt, history=history, summary=summary)
    log(f"before: reward {before_m['reward']:.3f} judge {before_m['judge']:.3f}; after: reward "
        f"{after_m['reward']:.3f} judge {after_m['judge']:.3f}; grid {paths['grid_before_after']}")
    return summary
