"""``flowbp-mini``: build, inspect, report and study the CPU miniature (it is aligned by ``flowbp-train``).

Subcommands: ``pretrain`` (the base model), ``train-reward`` (the reward CNN), ``train-judge`` (the SVC
judge) - each writes its file and its sha256 into ``--out`` (default ``./flowbp-mini-weights``; never the
installed package, whose committed files stay as shipped); ``sample`` (a grid of
every digit from the base model or a LoRA run); ``check`` (the base model's per-digit judge accuracy);
``report OUTPUT_DIR`` (before/after grids, curves and summary of a finished ``flowbp-train
recipes/mini/*.yaml`` run, :func:`flowbp_train.mini.report.report_run`); ``study``
(``benchmarks/mini_study.py``: every method on three tasks, 3 seeds). The trainer's ``flowbp-mini`` entry point calls
:func:`main`; a bad argument is one line on stderr and exit status 2, checked before any work.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from flowbp_train.mini import DEFAULT_OUT_DIR
from flowbp_train.usage import ArgumentParser, UsageError, run_main

#: Bounds of the numeric arguments (input checks): steps of pretraining / sampling, seeds of a study,
#: samples per prompt, threads (a shared machine), and the CFG scale (the miniature is used at 1-5).
MAX_STEPS = 1_000_000
MAX_SEEDS = 100
MAX_PER_PROMPT = 1000
MAX_THREADS = 1024
MAX_GUIDANCE = 100.0
THREADS_HELP = "CPU threads (default: one per idle core, chosen at start; see OMP_NUM_THREADS)"


def _adapter(guidance: float):
    from flowbp_train.models.mini import MiniAdapter

    return MiniAdapter.from_pretrained("mini", guidance_scale=guidance)


def _cmd_pretrain(a) -> int:
    from flowbp_train.mini.pretrain import PretrainConfig, pretrain

    pretrain(PretrainConfig(steps=a.steps, seed=a.seed, threads=a.threads), out_dir=a.out)
    return 0


def _cmd_train_reward(a) -> int:
    import torch

    from flowbp_train.mini.classifier import train_reward_cnn

    torch.set_num_threads(a.threads)
    train_reward_cnn(out_dir=a.out, seed=a.seed)
    return 0


def _cmd_train_judge(a) -> int:
    from flowbp_train.mini.classifier import train_judge

    train_judge(out_dir=a.out)
    return 0


def _cmd_sample(a) -> int:
    from flowbp_train.digits import canonical_prompts
    from flowbp_train.mini.report import eval_noise, generate, save_grid

    _threads(a)
    ad = _adapter(a.guidance)
    if a.lora:
        ad.load_lora_weights(a.lora)
    prompts = canonical_prompts()
    rows = [p for p in prompts for _ in range(a.per_prompt)]
    x = generate(ad, rows, eval_noise(ad, len(prompts), a.per_prompt), a.steps)
    print(save_grid(x, a.out, a.per_prompt))
    return 0


def _cmd_check(a) -> int:
    from flowbp_train.mini.report import evaluate
    from flowbp_train.rewards.mini import DigitJudge, DigitReward

    _threads(a)
    m, _ = evaluate(_adapter(a.guidance), DigitReward(), DigitJudge(), per_prompt=a.per_prompt, num_steps=a.steps)
    print(json.dumps(m, indent=2))
    return 0


def _cmd_report(a) -> int:
    from flowbp_train.mini.report import report_run

    _threads(a)
    report_run(a.output_dir)
    return 0


def _cmd_study(a) -> int:
    from flowbp_train.mini.study import METHOD_ORDER, TASKS, StudyConfig, run_study

    cfg = StudyConfig(steps=a.steps, seeds=a.seeds, tasks=a.tasks or list(TASKS), methods=a.methods or
                      list(METHOD_ORDER), draws=a.draws)
    run_study(cfg, workers=a.workers, out_dir=a.out, markdown=a.markdown, resume=a.resume)
    return 0


def _threads(a) -> None:
    """``--threads N`` when given; otherwise the count chosen at start (``flowbp_train.threads``)."""
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)


def _check(a) -> None:
    """Every argument of the chosen subcommand, before any work; UsageError names the argument."""
    from flowbp_kernels import METHODS

    def bounded(flag: str, lo, hi) -> None:
        val = getattr(a, flag.lstrip("-").replace("-", "_"), None)
        if val is not None and not (lo <= val <= hi):
            raise UsageError(f"{flag}: expected a value in [{lo}, {hi}], got {val}")

    bounded("--threads", 1, MAX_THREADS)
    bounded("--workers", 1, MAX_THREADS)
    bounded("--draws", 1, MAX_SEEDS)
    from flowbp_train.mini.study import TASKS

    for t in getattr(a, "tasks", None) or []:
        if t not in TASKS:
            raise UsageError(f"--tasks: expected some of {', '.join(TASKS)}, got {t!r}")
    bounded("--steps", 1, MAX_STEPS if a.command in ("pretrain", "study") else 1000)
    bounded("--seed", 0, 2**32 - 1)
    bounded("--seeds", 1, MAX_SEEDS)
    bounded("--per-prompt", 1, MAX_PER_PROMPT)
    guidance = getattr(a, "guidance", None)
    if guidance is not None and not (math.isfinite(guidance) and 0 < guidance <= MAX_GUIDANCE):
        raise UsageError(f"--guidance: expected a number in (0, {MAX_GUIDANCE:g}], got {guidance}")
    for m in getattr(a, "methods", None) or []:
        if m not in METHODS:
            raise UsageError(f"--method: expected one of {', '.join(METHODS)}, got {m!r}")
    lora = getattr(a, "lora", None)
    if lora is not None and not Path(lora).exists():
        raise UsageError(f"--lora: no such file or folder {lora!r}")
    if a.command == "report" and not (Path(a.output_dir) / "config.yaml").is_file():
        raise UsageError(f"output_dir: {a.output_dir!r} holds no finished flowbp-train run (no config.yaml)")
    out = getattr(a, "out", None)
    if out is not None and a.command in ("pretrain", "train-reward", "train-judge", "study") and Path(out).is_file():
        raise UsageError(f"--out: {out} is a file, expected a folder")
    if out is not None and a.command == "sample" and (Path(out).is_dir() or not Path(out).suffix):
        raise UsageError(f"--out: expected an image file name such as grid.png, got {out!r}")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="flowbp-mini", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("pretrain", help="rectified-flow pretraining of the base model (writes the weights)")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", default=DEFAULT_OUT_DIR, help=f"folder (default: ./{DEFAULT_OUT_DIR})")
    s.set_defaults(fn=_cmd_pretrain)
    for name, fn, help_ in (("train-reward", _cmd_train_reward, "train the reward CNN on half A"),
                            ("train-judge", _cmd_train_judge, "fit the SVC judge on half B")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--threads", type=int, default=1)
        s.add_argument("--out", default=DEFAULT_OUT_DIR, help=f"folder (default: ./{DEFAULT_OUT_DIR})")
        s.set_defaults(fn=fn)
    for name, fn, help_ in (("sample", _cmd_sample, "PNG grid of every digit"),
                            ("check", _cmd_check, "score the base model's samples (reward, judge per digit)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--guidance", type=float, default=1.0)
        s.add_argument("--steps", type=int, default=10)
        s.add_argument("--per-prompt", type=int, default=8)
        s.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
        if name == "sample":
            s.add_argument("--out", default="mini_samples.png")
            s.add_argument("--lora", default=None, help="a pytorch_lora_weights.safetensors to apply")
        s.set_defaults(fn=fn)
    s = sub.add_parser("report", help="grids, curves and summary of a finished flowbp-train mini run")
    s.add_argument("output_dir")
    s.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    s.set_defaults(fn=_cmd_report)
    s = sub.add_parser("study", help="every method on every task, several seeds (benchmarks/mini_study.py)")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--tasks", nargs="*", default=None, help="digit, shift, bold (default: all)")
    s.add_argument("--methods", nargs="*", default=None)
    s.add_argument("--draws", type=int, default=4, help="plan draws per method for the gradient measures")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: one per idle core)")
    s.add_argument("--out", default="benchmarks/results/mini_study")
    s.add_argument("--markdown", default=None, help="also write the tables to this file")
    s.add_argument("--resume", action="store_true", help="keep the finished jobs of --out/jobs.jsonl")
    s.set_defaults(fn=_cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flowbp-mini``; returns the exit status (2 and one line on a bad argument)."""
    return run_main("flowbp-mini", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    _check(args)
    from flowbp_train.threads import announce

    announce()  # the CPU thread settings chosen at start (flowbp_train.cli.mini_main)
    if getattr(args, "out", None) is not None and args.command in ("pretrain", "train-reward", "train-judge"):
        os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    rc = args.fn(args)
    print(f"flowbp-mini {args.command}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
