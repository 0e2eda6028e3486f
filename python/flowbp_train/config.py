"""The trainer's configuration: one typed dataclass, YAML recipes, ``key=value`` overrides.

Shared knobs keep the flag names of diffusers' training examples (``pretrained_model_name_or_path``,
``learning_rate``, ``max_train_steps``, ``rank``, ``lora_alpha``, ...). Method hyper-parameters go to
``flowbp_kernels.get_method`` through ``method_options`` (defaults: the authors' FLUX.1-dev settings,
shared/design/ALGORITHM.md section 4). :func:`validate` checks every value before anything is loaded
and raises :class:`ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("flux1", "sd3", "flux2", "mini")
#: The family's guidance when ``guidance_scale`` is left at None (REFERENCE.md section 1.5).
DEFAULT_GUIDANCE = {"flux1": 4.0, "sd3": 3.5, "flux2": 4.0, "mini": 1.0}
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb", "all", "none")

#: Built-in demo prompts (``prompts: demo``): varied subjects, short, in the style of HPDv2.
DEMO_PROMPTS = (
    "a red fox sitting in fresh snow, golden hour",
    "a cozy reading nook with a large window and rain outside",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with steam rising, studio photograph",
    "a lighthouse on a cliff during a storm, oil painting",
    "a futuristic city at night with neon reflections on wet streets",
    "a watercolor painting of a hummingbird and flowers",
    "a vintage bicycle leaning against a yellow wall",
    "a dragon made of autumn leaves flying over a forest",
    "portrait of an old fisherman, dramatic lighting",
    "a small wooden cabin beside a mountain lake at sunrise",
    "a cup of coffee with latte art on a marble table",
    "a cat wearing a tiny wizard hat, children's book illustration",
    "an underwater coral reef with colorful fish, high detail",
    "a steampunk airship above the clouds",
    "a field of sunflowers under a blue sky",
)


class ConfigError(ValueError):
    """An invalid configuration value; the message is one line and names the key."""


@dataclass
class TrainConfig:
    """Every setting of a training run. See ``recipes/`` for the reference values per backbone."""

    # model
    family: str = "flux1"
    pretrained_model_name_or_path: str | None = None
    revision: str | None = None
    resolution: int = 512
    guidance_scale: float | None = None  # None: the family's default (DEFAULT_GUIDANCE)
    grad_negative: bool = False  # keep the gradient of the negative CFG branch (SD3.5 LeapAlign does)
    cfg_grad_compensate: bool = False  # divide the loss by the CFG scale (FLUX.2 Lagrange reference)
    max_sequence_length: int | None = None  # text length; None: the pipeline's default
    offload_text_encoders: bool = True  # move text encoders to CPU once prompts are encoded
    vae_slicing: bool = False  # decode a batch one image at a time: same images, lower peak (--plan-memory)
    # method
    method: str = "flowbp-lagrange"
    method_options: dict = field(default_factory=dict)
    executor: str = "streaming"
    num_steps: int = 25  # rollout steps during training
    velocity_cache: str = "fp32"  # "fp32", "bf16" or "fp8"
    sampler_seed: int = 114  # the index sampler's generator, identical on every rank
    # reward and loss
    reward: str = "hpsv2"
    reward_kwargs: dict = field(default_factory=dict)
    loss: str = "hinge"  # "hinge": mean(w relu(loss_margin - R)); "neg": -mean(w R)
    loss_margin: float = 0.55
    # data
    prompts: Any = "demo"  # "demo", a text file (one prompt per line), or an inline list
    train_batch_size: int = 1  # per rank
    gradient_accumulation_steps: int = 1
    # optimisation
    rank: int = 16  # LoRA rank; 0 = full fine-tuning
    lora_alpha: float | None = None  # None: equal to rank
    lora_dropout: float = 0.0
    lora_target_modules: list | None = None  # None: diffusers' defaults for the family
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    max_train_steps: int = 300
    use_ema: bool = False
    ema_decay: float = 0.995
    mixed_precision: str = "bf16"  # "no" or "bf16"
    gradient_checkpointing: bool = True
    max_nonfinite_steps: int = 3  # this many non-finite steps in a row stop the run
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    distributed_strategy: str = "ddp"  # under torchrun: "ddp", "fsdp2" (fully_shard per block) or "none"
    # outputs
    output_dir: str = "flowbp-output"
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "flowbp"
    num_sample_images: int = 4  # sample images written at the end (0: none)
    sample_steps: int = 50  # Euler steps for the sample images (reference eval: 50; SD3.5 40)
    progress_bar: bool = True

    # ---------------------------------------------------------------------------------------- helpers
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def effective_guidance(self) -> float:
        return DEFAULT_GUIDANCE.get(self.family, 1.0) if self.guidance_scale is None else float(self.guidance_scale)

    @property
    def effective_lora_alpha(self) -> float:
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _type_name(tp) -> str:
    if tp is Any:
        return "any"
    args = typing.get_args(tp)
    if args:
        return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in args)
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value, tp):
    """Check ``value`` against the annotation ``tp`` (ints are accepted where floats are)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp in (dict, list):
        if isinstance(value, tp):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (``rank=0``, ``method_options={alpha: 0.2}``)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({str(exc).splitlines()[0]})") from None
    return key, value


def from_dict(values: dict, *, check: bool = True) -> TrainConfig:
    """Build a :class:`TrainConfig` from a mapping; unknown keys and wrong types raise ConfigError.
    Dotted keys set one entry of a dict field (``method_options.alpha=0.2``)."""
    if not isinstance(values, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {type(values).__name__}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config: keys must be strings, got {key!r}")
        top, _, sub = key.partition(".")
        if top not in _FIELDS:
            raise ConfigError(f"{key}: unknown key (see flowbp_train.config.TrainConfig for the accepted keys)")
        if sub:
            if _HINTS[top] is not dict:
                raise ConfigError(f"{key}: only dict keys accept a dotted sub-key")
            kwargs.setdefault(top, dict(values.get(top) or {}))
            kwargs[top][sub] = value
            continue
        if top in kwargs and isinstance(kwargs[top], dict) and isinstance(value, dict):
            kwargs[top] = {**value, **kwargs[top]}
            continue
        kwargs[top] = _coerce(key, value, _HINTS[top])
    cfg = TrainConfig(**kwargs)
    if check:
        validate(cfg)
    return cfg


def load_config(recipe: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                *, check: bool = True) -> TrainConfig:
    """Read a YAML recipe (optional) and apply overrides (``["key=value", ...]`` or a dict)."""
    import yaml

    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe: file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"recipe: {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe: {path} must hold a mapping of keys to values")
        values.update(loaded)
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in (overrides or [])]
    for key, value in items:
        top = key.partition(".")[0]
        if key == top and isinstance(value, dict) and isinstance(values.get(top), dict):
            values[top] = {**values[top], **value}
        else:
            values[key] = value
    return from_dict(values, check=check)


def load_prompts(spec) -> list[str]:
    """The training prompts: ``"demo"``, a text file (one per line, blank lines skipped) or a list."""
    if isinstance(spec, str) and spec == "demo":
        return list(DEMO_PROMPTS)
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(p, str) for p in spec):
            raise ConfigError("prompts: an inline list must hold only strings")
        return [p.strip() for p in spec if p.strip()]
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"prompts: expected 'demo', a list or a text file; file not found: {spec}")
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ConfigError(f"prompts: expected 'demo', a list of strings or a text file path, got {type(spec).__name__}")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value (types, ranges, cross-field rules); raises ConfigError naming the key."""
    from flowbp_kernels import EXECUTORS, METHODS, get_method

    for name in _FIELDS:  # types again: the dataclass can be built or mutated directly
        setattr(cfg, name, _coerce(name, getattr(cfg, name), _HINTS[name]))
    from flowbp_train.models import ADAPTERS

    families = sorted(set(FAMILIES) | set(ADAPTERS))
    _need(cfg.family in families, f"family: expected one of {', '.join(families)}, got {cfg.family!r}")
    _need(bool(cfg.pretrained_model_name_or_path),
          "pretrained_model_name_or_path: missing; pass a local folder or a model id, "
          "e.g. pretrained_model_name_or_path=/models/FLUX.1-dev")
    _need(cfg.method in METHODS, f"method: expected one of {', '.join(METHODS)}, got {cfg.method!r}")
    _need(cfg.executor in EXECUTORS, f"executor: expected one of {', '.join(EXECUTORS)}, got {cfg.executor!r}")
    _need(cfg.distributed_strategy in ("ddp", "fsdp2", "none"),
          f"distributed_strategy: expected ddp, fsdp2 or none, got {cfg.distributed_strategy!r}")
    _need(cfg.velocity_cache in ("fp32", "bf16", "fp8"),
          f"velocity_cache: expected fp32, bf16 or fp8, got {cfg.velocity_cache!r}")
    _need(cfg.num_steps >= 1, f"num_steps: expected an integer >= 1, got {cfg.num_steps}")
    _need(cfg.resolution >= 16 and cfg.resolution % 16 == 0,
          f"resolution: expected a multiple of 16 >= 16, got {cfg.resolution}")
    try:
        method = get_method(cfg.method, **cfg.method_options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method_options: {exc}") from None
    window = cfg.num_steps - method.window_start(cfg.num_steps)
    opts = method.options
    if "num_active" in opts and cfg.method in ("flowbp-sparse", "flowbp-bridge", "draft-k", "drtune"):
        _need(opts["num_active"] <= window,
              f"method_options.num_active: {opts['num_active']} active steps exceed the {window} steps of the "
              f"training window (num_steps={cfg.num_steps}, tail_ratio={opts['tail_ratio']})")
    if cfg.method == "refl":
        _need(opts["last_n"] <= cfg.num_steps,
              f"method_options.last_n: {opts['last_n']} exceeds num_steps={cfg.num_steps}")
    min_window = {"leapalign": 2, "flowbp-lagrange": 3, "flowbp-bridge": 3}.get(cfg.method, 1)
    _need(window >= min_window, f"num_steps: {cfg.method} needs a training window of at least {min_window} steps, "
          f"got {window} (num_steps={cfg.num_steps}, tail_ratio={opts['tail_ratio']})")
    _need(cfg.loss in ("hinge", "neg"), f"loss: expected 'hinge' or 'neg', got {cfg.loss!r}")
    _need(math.isfinite(cfg.loss_margin), f"loss_margin: expected a finite number, got {cfg.loss_margin}")
    _need(isinstance(cfg.reward, str) and cfg.reward != "", "reward: expected a reward name, got an empty value")
    prompts = cfg.prompts
    _need(isinstance(prompts, (str, list)),
          f"prompts: expected 'demo', a list of strings or a text file path, got {type(prompts).__name__}")
    _need(len(load_prompts(prompts)) > 0, f"prompts: no prompts found in {prompts!r}")
    _need(cfg.train_batch_size >= 1, f"train_batch_size: expected an integer >= 1, got {cfg.train_batch_size}")
    _need(cfg.gradient_accumulation_steps >= 1,
          f"gradient_accumulation_steps: expected an integer >= 1, got {cfg.gradient_accumulation_steps}")
    _need(cfg.rank >= 0, f"rank: expected an integer >= 0 (0 = full fine-tuning), got {cfg.rank}")
    _need(cfg.lora_alpha is None or cfg.lora_alpha > 0, f"lora_alpha: expected a number > 0, got {cfg.lora_alpha}")
    _need(0 <= cfg.lora_dropout < 1, f"lora_dropout: expected a number in [0, 1), got {cfg.lora_dropout}")
    _need(cfg.lora_target_modules is None or (len(cfg.lora_target_modules) > 0 and all(
        isinstance(m, str) for m in cfg.lora_target_modules)),
        "lora_target_modules: expected null or a non-empty list of module names")
    for key in ("learning_rate", "adam_epsilon"):
        val = getattr(cfg, key)
        _need(math.isfinite(val) and val > 0, f"{key}: expected a number > 0, got {val}")
    for key in ("adam_beta1", "adam_beta2"):
        val = getattr(cfg, key)
        _need(0 <= val < 1, f"{key}: expected a number in [0, 1), got {val}")
    _need(math.isfinite(cfg.adam_weight_decay) and cfg.adam_weight_decay >= 0,
          f"adam_weight_decay: expected a number >= 0, got {cfg.adam_weight_decay}")
    _need(cfg.max_grad_norm > 0, f"max_grad_norm: expected a number > 0, got {cfg.max_grad_norm}")
    _need(cfg.lr_scheduler in LR_SCHEDULERS,
          f"lr_scheduler: expected one of {', '.join(LR_SCHEDULERS)}, got {cfg.lr_scheduler!r}")
    _need(cfg.lr_warmup_steps >= 0, f"lr_warmup_steps: expected an integer >= 0, got {cfg.lr_warmup_steps}")
    _need(cfg.max_train_steps >= 1, f"max_train_steps: expected an integer >= 1, got {cfg.max_train_steps}")
    _need(0 < cfg.ema_decay < 1, f"ema_decay: expected a number in (0, 1), got {cfg.ema_decay}")
    _need(cfg.mixed_precision in ("no", "bf16"), f"mixed_precision: expected 'no' or 'bf16', got "
          f"{cfg.mixed_precision!r}")
    _need(cfg.guidance_scale is None or (math.isfinite(cfg.guidance_scale) and cfg.guidance_scale > 0),
          f"guidance_scale: expected null or a number > 0, got {cfg.guidance_scale}")
    _need(cfg.max_nonfinite_steps >= 1, f"max_nonfinite_steps: expected an integer >= 1, got {cfg.max_nonfinite_steps}")
    _need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
          f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    _need(bool(cfg.output_dir), "output_dir: expected a folder path, got an empty value")
    _need(cfg.checkpointing_steps >= 1, f"checkpointing_steps: expected an integer >= 1, got {cfg.checkpointing_steps}")
    _need(cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1,
          f"checkpoints_total_limit: expected null or an integer >= 1, got {cfg.checkpoints_total_limit}")
    _need(cfg.report_to in REPORT_TO, f"report_to: expected one of {', '.join(REPORT_TO)}, got {cfg.report_to!r}")
    _need(cfg.num_sample_images >= 0, f"num_sample_images: expected an integer >= 0, got {cfg.num_sample_images}")
    _need(cfg.sample_steps >= 1, f"sample_steps: expected an integer >= 1, got {cfg.sample_steps}")
    _need(cfg.max_sequence_length is None or cfg.max_sequence_length >= 1,
          f"max_sequence_length: expected null or an integer >= 1, got {cfg.max_sequence_length}")
    return cfg


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (what ``--dry-run`` prints and ``output_dir`` keeps)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
