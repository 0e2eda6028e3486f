"""Console entry points: ``flowbp-train``, ``flowbp-eval`` and ``flowbp-mini``.

``flowbp-train RECIPE [key=value ...] [--dry-run]`` reads a YAML recipe (``recipes/<family>/<method>.yaml``),
applies the overrides (values parsed as YAML), validates everything before any model is loaded (one-line
errors naming the key, exit status 2) and trains; ``--dry-run`` prints the resolved config and exits;
``--plan-memory [--gpu-memory GiB] [--world-size N]`` simulates one step and prints its GPU memory (per
rank with N ranks; ``flowbp_train.memory``).
``flowbp-eval`` and ``flowbp-mini`` forward to ``flowbp_train.evaluate.main`` and
``flowbp_train.mini.cli.main``, imported only when called. All three report a bad argument the same way:
one line ``<prog>: error: ...`` on stderr and exit status 2 (``flowbp_train.usage``).
This module must not import torch: a CPU run's thread count and OpenMP wait policy
(:mod:`flowbp_train.threads`) are set here, before torch starts its thread pool.
"""

from __future__ import annotations

import os
import sys

from flowbp_train.usage import ArgumentParser


def train_main(argv: list[str] | None = None) -> int:
    """``flowbp-train RECIPE [key=value ...] [--dry-run]``; returns the exit status."""
    from flowbp_train.config import ConfigError, dump_yaml, load_config

    parser = ArgumentParser(
        prog="flowbp-train",
        description="Align a flow-matching text-to-image model by direct reward backpropagation.",
        epilog="Example: flowbp-train recipes/flux1/flowbp-lagrange.yaml "
               "pretrained_model_name_or_path=/models/FLUX.1-dev",
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/flux1/flowbp-lagrange.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a config key (YAML value)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--plan-memory", action="store_true",
                        help="simulate one training step at full size (no GPU, no weights) and print its memory")
    parser.add_argument("--gpu-memory", metavar="GiB", help="with --plan-memory: say whether the run fits a GPU "
                        "of this size and which changes would make it fit")
    parser.add_argument("--world-size", metavar="N", help="with --plan-memory: plan rank 0 of N ranks "
                        "(distributed_strategy: ddp or fsdp2)")
    try:  # key=value overrides before or after the options (``RECIPE --plan-memory key=value``)
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if args.plan_memory or args.gpu_memory is not None or args.world_size is not None:
        from flowbp_train.memory.cli import plan_main

        return plan_main(args.recipe, args.overrides, args.gpu_memory, plan=args.plan_memory,
                         world_size=args.world_size)
    if not args.dry_run:  # before anything imports torch (load_config's checks do)
        from flowbp_train.threads import policy_for_train

        policy_for_train("flowbp-train", args.recipe, args.overrides)
    try:
        cfg = load_config(args.recipe, args.overrides)
        if not args.dry_run:  # every file the run needs (model folder, reward weights), before any import
            from flowbp_train.preflight import preflight

            preflight(cfg)
    except ConfigError as exc:
        print(f"flowbp-train: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        return 0
    from flowbp_train.checkpoint import CheckpointError
    from flowbp_train.rundir import OutputDirBusy
    from flowbp_train.trainer import train

    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun / accelerate launch: rank 0 speaks
    try:
        result = train(cfg)
    except (ConfigError, CheckpointError, OutputDirBusy) as exc:  # found before any training work
        if main_rank:
            print(f"flowbp-train: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if main_rank:
        print(f"flowbp-train: {result.global_step} steps done; outputs in {result.output_dir}")
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``flowbp-eval``: see ``flowbp_train.evaluate``."""
    from flowbp_train.threads import policy_for_eval

    args = sys.argv[1:] if argv is None else list(argv)
    if not any(a in ("-h", "--help") for a in args):
        policy_for_eval("flowbp-eval", args)
    from flowbp_train import evaluate  # imports torch

    return evaluate.main(argv)


def mini_main(argv: list[str] | None = None) -> int:
    """``flowbp-mini``: the CPU miniature, see ``flowbp_train.mini.cli``."""
    from flowbp_train.threads import policy_for_mini

    policy_for_mini("flowbp-mini", sys.argv[1:] if argv is None else list(argv))
    from flowbp_train.mini import cli

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
