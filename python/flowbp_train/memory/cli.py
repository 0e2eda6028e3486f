"""``flowbp-train RECIPE [key=value ...] --plan-memory [--gpu-memory GiB] [--world-size N]``: the simulated plan.

Every input is checked before anything is built (one-line errors, exit status 2). Exit status 0 when the
plan was made (and, with ``--gpu-memory``, the run fits), 1 when it does not fit.
"""

from __future__ import annotations

import math
import sys


def _error(msg: str) -> int:
    print(f"flowbp-train: error: {msg}", file=sys.stderr)
    return 2


#: unit suffixes ``--gpu-memory`` takes, all meaning GiB: cards are sold by GiB under the name "GB"
#: (an "80GB" card holds 80 GiB)
GPU_MEMORY_UNITS = ("gib", "gb", "g")


def parse_gpu_memory(text: str | None) -> float | None:
    """``--gpu-memory`` as a number of GiB > 0, optionally with a unit (``80``, ``80GiB``, ``80GB``,
    ``80G``: all 80 GiB); ValueError with a one-line message otherwise."""
    if text is None:
        return None
    number = text.strip()
    for unit in GPU_MEMORY_UNITS:
        if number.lower().endswith(unit):
            number = number[: -len(unit)].strip()
            break
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"--gpu-memory: expected a number of GiB > 0 (e.g. 80 or 80GiB), got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--gpu-memory: expected a number of GiB > 0, got {text!r}")
    return value


def parse_world_size(text: str | None) -> int:
    """``--world-size`` as an integer >= 1 (default 1; ValueError with a one-line message otherwise)."""
    if text is None:
        return 1
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--world-size: expected an integer >= 1 (ranks), got {text!r}") from None
    if value < 1:
        raise ValueError(f"--world-size: expected an integer >= 1 (ranks), got {text!r}")
    return value


def plan_main(recipe: str, overrides: list[str], gpu_memory: str | None, *, plan: bool = True,
              world_size: str | None = None) -> int:
    from flowbp_train.config import ConfigError, load_config

    if not plan:
        return _error("--gpu-memory: only with --plan-memory" if gpu_memory is not None
                      else "--world-size: only with --plan-memory")
    try:
        gib = parse_gpu_memory(gpu_memory)
        ranks = parse_world_size(world_size)
        cfg = load_config(recipe, overrides, check=False)
        from flowbp_train.memory.planner import prepare_config

        cfg = prepare_config(cfg)
        from flowbp_train.memory.build import REWARD_TOWERS, as_dtype

        if cfg.reward not in REWARD_TOWERS and cfg.reward != "mini":
            raise ValueError(f"reward: the memory planner knows the architectures of "
                             f"{', '.join(REWARD_TOWERS)} and mini, got {cfg.reward!r}")
        as_dtype(cfg.reward_kwargs.get("dtype", "fp32"), "reward_kwargs.dtype")
        if cfg.family != "mini":  # the architecture (the folder's config files or the shipped one), now
            from flowbp_train.memory.build import check_spec, component_specs

            check_spec(cfg.family, component_specs(cfg.family, cfg.pretrained_model_name_or_path))
    except (ConfigError, ValueError) as exc:
        return _error(" ".join(str(exc).split()))
    from flowbp_train.memory.planner import plan_memory

    try:
        result = plan_memory(cfg, gpu_memory=gib, world_size=ranks, progress=gib is not None)
    except (ValueError, NotImplementedError) as exc:
        return _error(" ".join(str(exc).split()))
    print(result.table())
    return 0 if result.fits in (None, True) else 1
