"""What a person wants to see after a miniature run: sample grids, curves, a summary JSON (``flowbp-mini report``).

:func:`generate` samples fixed seeds through the adapter (Euler, no grad); :func:`evaluate` scores them
with the reward, the held-out judge and the image statistics of :mod:`flowbp_train.mini.metrics`;
:func:`save_grid` / :func:`save_before_after` write PNG grids (one row per prompt, one column per seed,
the same noise before and after); :func:`plot_curves` plots reward and judge against the step.
:func:`report_run` (``flowbp-mini report OUTPUT_DIR``, which ``scripts/quickstart.sh`` runs after
``flowbp-train recipes/mini/*.yaml``) writes, from the run's files alone (``config.yaml``,
``logs/train_log.jsonl``, the ``checkpoint-<step>/`` LoRAs for the held-out curve and the final LoRA
for the after grid): ``grid_before_after.png`` (every prompt x 8 fixed seeds, base on the left, aligned
on the right, same noise), ``grid_before.png`` / ``grid_after.png``, ``curves.png`` and ``summary.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from flowbp_kernels import rollout
from flowbp_train.digits import canonical_prompts, digits_of_prompts
from flowbp_train.mini.metrics import image_stats

EVAL_SEED = 1234  # seeds of evaluation noise: EVAL_SEED + column index (never used for training noise)


def eval_noise(adapter, num_prompts: int, per_prompt: int, seed: int = EVAL_SEED) -> torch.Tensor:
    """``[num_prompts * per_prompt, 1, 16, 16]``: column c uses the generator seeded ``seed + c`` for every
    prompt row, so a grid shows the same noise per column and before/after share it exactly."""
    cols = [adapter.initial_noise(1, torch.Generator().manual_seed(seed + c)) for c in range(per_prompt)]
    return torch.cat([cols[c] for _ in range(num_prompts) for c in range(per_prompt)])


@torch.no_grad()
def generate(adapter, prompts: Sequence[str], noise: torch.Tensor, num_steps: int = 10,
             batch_size: int = 100) -> torch.Tensor:
    """Samples ``[B, 1, 16, 16]`` (latent space, fp32, CPU) for ``prompts`` from ``noise`` ``[B, ...]``."""
    if len(prompts) != noise.shape[0]:
        raise ValueError(f"prompts ({len(prompts)}) and noise ({noise.shape[0]}) must have the same length")
    sig = adapter.sigmas(num_steps)
    outs = []
    for s in range(0, len(prompts), batch_size):
        batch = adapter.encode_prompts(list(prompts[s:s + batch_size]))
        ro = rollout(adapter.velocity_fn(batch, sig), noise[s:s + batch_size], sig)
        outs.append(ro.sample.float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def evaluate(adapter, reward, judge, *, per_prompt: int = 8, num_steps: int = 10,
             prompts: Sequence[str] | None = None, seed: int = EVAL_SEED) -> tuple[dict, torch.Tensor]:
    """Sample ``per_prompt`` fixed seeds of each prompt (default: the ten canonical prompts) and score.

    Returns (metrics, samples): metrics hold ``reward`` (mean), ``judge`` (accuracy), ``judge_per_digit``,
    ``diversity``, ``total_variation``, ``high_freq_energy``."""
    prompts = list(prompts or canonical_prompts())
    rows = [p for p in prompts for _ in range(per_prompt)]
    x = generate(adapter, rows, eval_noise(adapter, len(prompts), per_prompt, seed), num_steps)
    images = adapter.decode(x)
    r = reward.score(images, rows)
    j = judge.score(images, rows)
    digits = digits_of_prompts(rows)
    per_digit = {int(d): float(j[digits == d].mean()) for d in digits.unique()}
    metrics = {"reward": float(r.mean()), "judge": float(j.mean()), "judge_per_digit": per_digit,
               **image_stats(x.clamp(-1, 1), digits)}
    return metrics, x


def save_grid(samples: torch.Tensor, path: str | Path, ncol: int, scale: int = 4) -> Path:
    """Write ``samples`` ``[B, 1, H, W]`` in [-1, 1] as a PNG grid with ``ncol`` columns (row-major),
    each image enlarged ``scale`` times (nearest) with a 1-pixel gap."""
    from PIL import Image

    if samples.dim() != 4 or samples.shape[1] != 1:
        raise ValueError(f"samples must be [B, 1, H, W], got {tuple(samples.shape)}")
    b, _, h, w = samples.shape
    nrow = -(-b // ncol)
    img = ((samples.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]
    img = img.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    hh, ww = h * scale, w * scale
    canvas = torch.full((nrow * (hh + 1) + 1, ncol * (ww + 1) + 1), 128, dtype=torch.uint8)
    for k in range(b):
        r, c = divmod(k, ncol)
        canvas[1 + r * (hh + 1):1 + r * (hh + 1) + hh, 1 + c * (ww + 1):1 + c * (ww + 1) + ww] = img[k]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas.numpy(), mode="L").save(path)
    return path


def save_before_after(before: torch.Tensor, after: torch.Tensor, path: str | Path, ncol: int) -> Path:
    """One PNG: the ``before`` grid on the left, the ``after`` grid on the right (same layout, same
    seeds), separated by a white bar."""
    from PIL import Image

    tmp = Path(path)
    a = save_grid(before, tmp.with_suffix(".before.png"), ncol)
    b = save_grid(after, tmp.with_suffix(".after.png"), ncol)
    ia, ib = Image.open(a), Image.open(b)
    out = Image.new("L", (ia.width + ib.width + 8, ia.height), 255)
    out.paste(ia, (0, 0))
    out.paste(ib, (ia.width + 8, 0))
    out.save(tmp)
    return tmp


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """PNG of the training reward (every step) and the evaluation reward / judge (where logged).

    ``history``: dicts with ``step`` and any of ``train_reward``, ``eval_reward``, ``eval_judge``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for key, ax, label in (("train_reward", axes[0], "training reward (batch)"),
                           ("eval_reward", axes[0], "reward, eval seeds"),
                           ("eval_judge", axes[1], "held-out judge accuracy")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if key != "train_reward" else None, ms=3, label=label)
    axes[0].set_ylabel("log p(digit | image)")
    axes[1].set_ylabel("accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_summary(path: str | Path, summary: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return path


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


def report_run(output_dir: str | Path, *, per_prompt: int = 8, log=print) -> dict:
    """The report of a finished trainer run of the miniature (see the module docstring)."""
    import yaml

    from flowbp_train.models.mini import MiniAdapter
    from flowbp_train.rewards.mini import DigitJudge, DigitReward
    from flowbp_train.weights import LORA_FILE

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
            ad.load_lora_weights(lora, alpha=cfg.get("lora_alpha"))
        return evaluate(ad, reward, judge, per_prompt=per_prompt, num_steps=n)

    history = []
    log_file = out / cfg.get("logging_dir", "logs") / "train_log.jsonl"
    if log_file.is_file():
        for line in log_file.read_text().splitlines():
            rec = json.loads(line)
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
