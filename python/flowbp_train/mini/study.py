"""The miniature study: every method, identical settings, several seeds (``benchmarks/mini_study.py``).

Per seed, on one shared first batch (same prompts, noise and LoRA initialisation for every method):
the cosine between each method's gradient and the exact full-backprop gradient (method ``full``), and
the bytes autograd saves for backward (peak alive at once) under the streaming and retain executors.
Then each method trains its own fresh LoRA for the same number of steps with the same loop
(:func:`flowbp_train.mini.align.align`, no per-method tuning; only ReFL's step-counting option is
rescaled to the 10-step schedule) and is scored on fixed evaluation seeds: reward, held-out judge,
diversity and total variation, and the median step time.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from flowbp_kernels import METHODS, get_method, reward_backprop, rollout

COLUMNS = ("reward gain", "judge", "diversity", "TV", "cos vs full", "saved MB stream/retain", "step ms")


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def first_step_measures(adapter, reward, params, cfg, methods, seed: int) -> dict[str, dict]:
    """Gradient cosine vs full backprop and saved-for-backward bytes, on one shared batch."""
    from flowbp_train.mini.align import flat_grad, saved_bytes_meter, step_scaled_options, train_prompts

    gen = torch.Generator().manual_seed(seed)
    prompts = train_prompts(gen, cfg.batch_size)
    batch = adapter.encode_prompts(prompts)
    sig = adapter.sigmas(cfg.num_steps)
    vf = adapter.velocity_fn(batch, sig)
    ro = rollout(vf, adapter.initial_noise(cfg.batch_size, gen), sig)
    exclude = list(adapter.transformer.parameters()) + list(reward.parameters())

    def rfn(x):
        return reward.score(adapter.decode(x), prompts)

    def grad_of(name: str, executor: str):
        method = get_method(name, **step_scaled_options(name, cfg.num_steps))
        for p in params:
            p.grad = None
        with saved_bytes_meter(exclude) as stats:
            out = reward_backprop(method, vf, ro, rfn, generator=torch.Generator().manual_seed(10_000 + seed),
                                  noise_generator=torch.Generator().manual_seed(20_000 + seed),  # DRaFT-LV's
                                  executor=executor, params=params, loss="neg")
        return flat_grad(params), stats["peak"], out.diagnostics["num_reforwards"]

    g_full, _, _ = grad_of("full", "streaming")
    res = {}
    for name in methods:
        g, peak_stream, nref = grad_of(name, "streaming")
        _, peak_retain, _ = grad_of(name, "retain")
        cos = float(torch.nn.functional.cosine_similarity(g, g_full, dim=0))
        res[name] = {"cos_vs_full": cos, "saved_bytes_streaming": peak_stream, "saved_bytes_retain": peak_retain,
                     "reforwards": nref, "grad_norm_ratio": float(g.norm() / g_full.norm())}
    for p in params:
        p.grad = None
    return res


def run_study(steps: int = 40, seeds: int = 3, out_dir: str | Path = "benchmarks/results/mini_study",
              methods: list[str] | None = None, threads: int = 1, markdown: str | Path | None =
              "docs/readme/mini_results.md", log=print) -> dict:
    """Run the study; writes ``study.json`` and ``study.png`` into ``out_dir`` and the markdown table
    to ``markdown``; returns the aggregated results."""
    from flowbp_train.mini.align import AlignConfig, add_lora, align
    from flowbp_train.models.mini import MiniAdapter
    from flowbp_train.rewards.mini import DigitJudge, DigitReward

    methods = list(methods or METHODS)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if seeds < 1 or steps < 1:
        raise ValueError(f"steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    reward, judge = DigitReward(), DigitJudge()
    raw: dict[str, list[dict]] = {m: [] for m in methods}
    for seed in range(seeds):
        cfg = AlignConfig(steps=steps, seed=seed, eval_every=max(1, steps // 4))
        ad = MiniAdapter.from_pretrained("mini")
        params = add_lora(ad.transformer, cfg.rank, ad.default_lora_targets, seed)
        first = first_step_measures(ad, reward, params, cfg, methods, seed)
        for m in methods:
            log(f"seed {seed}, {m}: cos vs full {first[m]['cos_vs_full']:.3f}")
            ad = MiniAdapter.from_pretrained("mini")
            cfg_m = AlignConfig(method=m, steps=steps, seed=seed, eval_every=max(1, steps // 4))
            res = align(ad, reward, judge, cfg_m, log=lambda s: None)
            before, after = res["evals"][0], res["evals"][steps]
            train = [h["train_reward"] for h in res["history"] if "train_reward" in h]
            k = max(1, min(5, len(train) // 4))
            raw[m].append({
                "seed": seed, **first[m], "eval_reward_before": before["reward"], "eval_reward_after": after["reward"],
                "train_reward_first": statistics.fmean(train[:k]), "train_reward_last": statistics.fmean(train[-k:]),
                "judge_before": before["judge"], "judge_after": after["judge"],
                "diversity_before": before["diversity"], "diversity_after": after["diversity"],
                "tv_before": before["total_variation"], "tv_after": after["total_variation"],
                "hf_after": after["high_freq_energy"], "step_time_s": res["step_time_median_s"],
                "curve": [(h["step"], h["eval_reward"], h["eval_judge"]) for h in res["history"] if "eval_reward" in h],
            })
            log(f"seed {seed}, {m}: reward {before['reward']:.3f} -> {after['reward']:.3f}, judge "
                f"{before['judge']:.3f} -> {after['judge']:.3f}, {res['step_time_median_s'] * 1e3:.0f} ms/step "
                f"({time.perf_counter() - t_start:.0f}s)")
    agg = aggregate(raw)
    from flowbp_train.mini.metrics import data_reference

    info = {"steps": steps, "seeds": seeds, "batch_size": 32, "num_steps": 10, "learning_rate": 1e-3, "rank": 8,
            "guidance_scale": 1.0, "threads": threads, "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "git": _git_rev(), "total_seconds": time.perf_counter() - t_start,
            "real_data": data_reference()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({"info": info, "aggregate": agg, "raw": raw}, indent=2) + "\n")
    plot_study(agg, raw, out / "study.png")
    table = markdown_table(agg, info)
    print(table)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(table)
    return {"info": info, "aggregate": agg}


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def aggregate(raw: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and standard deviation over seeds of every reported quantity, per method."""
    agg = {}
    for m, runs in raw.items():
        if not runs:
            continue
        row = {}
        for key in ("eval_reward_before", "eval_reward_after", "judge_before", "judge_after", "diversity_after",
                    "tv_after", "hf_after", "cos_vs_full", "grad_norm_ratio", "saved_bytes_streaming",
                    "saved_bytes_retain", "step_time_s", "reforwards"):
            row[key] = _mean_sd([float(r[key]) for r in runs])
        row["reward_gain"] = _mean_sd([r["eval_reward_after"] - r["eval_reward_before"] for r in runs])
        row["train_reward_gain"] = _mean_sd([r["train_reward_last"] - r["train_reward_first"] for r in runs])
        row["diversity_before"] = _mean_sd([r["diversity_before"] for r in runs])
        row["tv_before"] = _mean_sd([r["tv_before"] for r in runs])
        agg[m] = row
    return agg


def markdown_table(agg: dict[str, dict], info: dict) -> str:
    """The study as a markdown table (mean +- sd over seeds)."""
    def f(pair, fmt="{:.3f}"):
        return f"{fmt.format(pair[0])} ± {fmt.format(pair[1])}"

    first = next(iter(agg.values()))
    lines = [
        f"Miniature study: {info['steps']} LoRA steps per method, batch {info['batch_size']}, "
        f"{info['num_steps']}-step rollouts, lr {info['learning_rate']}, rank {info['rank']}, "
        f"{info['seeds']} seeds (mean ± sd), {info['threads']} CPU thread(s), torch {info['torch']}, "
        f"git {info['git']}; total {info['total_seconds'] / 60:.1f} min.",
        f"Base model on the evaluation seeds: reward {first['eval_reward_before'][0]:.3f}, judge "
        f"{first['judge_before'][0]:.3f}, diversity {first['diversity_before'][0]:.2f}, TV "
        f"{first['tv_before'][0]:.3f} (real digits: diversity {info['real_data']['diversity']:.2f}, "
        f"TV {info['real_data']['total_variation']:.3f}).",
        "",
        "| method | eval reward gain | train reward gain | judge after | diversity after | TV after | "
        "cos(grad, full) | grad norm / full | saved-for-backward MB (streaming / retain) | re-forwards | step ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in agg.items():
        lines.append(
            f"| {m} | {f(r['reward_gain'])} | {f(r['train_reward_gain'])} | {f(r['judge_after'])} | "
            f"{f(r['diversity_after'], '{:.2f}')} | {f(r['tv_after'])} | {f(r['cos_vs_full'])} | "
            f"{r['grad_norm_ratio'][0]:.2f} | {r['saved_bytes_streaming'][0] / 2**20:.1f} / "
            f"{r['saved_bytes_retain'][0] / 2**20:.1f} | {r['reforwards'][0]:.1f} | "
            f"{r['step_time_s'][0] * 1e3:.0f} |")
    return "\n".join(lines) + "\n"


def plot_study(agg: dict[str, dict], raw: dict[str, list[dict]], path: str | Path) -> Path:
    """Four panels: eval reward curves, judge after, cosine vs full, saved bytes (streaming, retain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(agg)
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    for m in names:
        curves = [r["curve"] for r in raw[m]]
        steps = [c[0] for c in curves[0]]
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax[0].plot(steps, mean, marker="o", ms=3, label=m)
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("eval reward log p(digit)")
    ax[0].legend(fontsize=6)
    x = range(len(names))
    for a, key, label in ((ax[1], "judge_after", "judge accuracy after"), (ax[2], "cos_vs_full",
                                                                             "cos(first grad, full)")):
        a.bar(x, [agg[m][key][0] for m in names], yerr=[agg[m][key][1] for m in names], color="tab:blue")
        a.set_ylabel(label)
    w = 0.4
    ax[3].bar([i - w / 2 for i in x], [agg[m]["saved_bytes_streaming"][0] / 2**20 for m in names], w,
              label="streaming")
    ax[3].bar([i + w / 2 for i in x], [agg[m]["saved_bytes_retain"][0] / 2**20 for m in names], w, label="retain")
    ax[3].set_ylabel("saved for backward (MB)")
    ax[3].legend(fontsize=7)
    for a in ax[1:]:
        a.set_xticks(list(x))
        a.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
