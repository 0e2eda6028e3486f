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
#: The image side must be a multiple of the VAE's downsampling times the transformer's patch size (the
#: latent is cut into patch x patch tokens): FLUX.1 8 x 2 (2x2 packing), SD3.5 8 x 2 (patch 2), FLUX.2
#: 8 x 2 (2x2 patchify), from the released models' configs; checked here without loading a model.
RESOLUTION_FACTOR = {"flux1": 8 * 2, "sd3": 8 * 2, "flux2": 8 * 2}
RESOLUTION_FACTOR["flux2-dev"] = 8 * 2  # FLUX.2-dev: FLUX.2's 2x2 patchify of the 8x VAE
RESOLUTION_FACTOR["z-image"] = 8 * 2  # Z-Image: FLUX.1's 8x VAE, 2x2 patches in the transformer
#: Families that generate one size only (the miniature works in 16x16 pixel space).
FIXED_RESOLUTION = {"mini": 16}
#: Registered families without an entry above: the common factor of the diffusers pipelines.
DEFAULT_RESOLUTION_FACTOR = 16
# Upper bounds (named so that a typo fails before hours of loading, each with its reason):
#: 4096 px: 16x the area of FLUX.1's 1024 px training resolution; beyond it no supported model works.
MAX_RESOLUTION = 4096
#: Rollout and sample steps: the flow models are trained on 1000 timesteps; a finer grid adds nothing but
#: cached latents and model calls.
MAX_NUM_STEPS = 1000
MAX_SAMPLE_STEPS = 1000
#: LoRA rank: above 1024 the update is no longer low-rank for the 1536-3072-wide projections of the
#: supported transformers; train with rank=0 (full fine-tuning) instead.
MAX_LORA_RANK = 1024
#: lora_alpha / rank scales the update; above 4096 it is a learning-rate multiplier in disguise.
MAX_LORA_ALPHA = 4096.0
#: Seeds: numpy's range; the trainer adds 1000 x rank + 1, which stays far below torch's 2**64 limit.
MAX_SEED = 2**32 - 1
#: AdamW moves a weight by about the learning rate per step; above 1 every weight of order 1 is lost.
MAX_LEARNING_RATE = 1.0
MAX_TRAIN_STEPS = 10_000_000
#: Per-rank batch and accumulation: beyond 4096 samples a step no card holds the activations.
MAX_BATCH = 4096
MAX_SAMPLE_IMAGES = 1000
#: Text tokens: T5 is used with 512 at most by the supported pipelines.
MAX_SEQUENCE_LENGTH = 4096
#: Classifier-free guidance: the models are used at 1-10; above 100 the samples saturate.
MAX_GUIDANCE = 100.0
#: A prompt file of a million prompts of 60 characters.
MAX_PROMPTS_BYTES = 64 << 20
#: Keys whose change makes a checkpoint's tensors mean something else (or makes them unusable): the base
#: model, the method, the trainable parameters (LoRA rank, alpha, targets or full fine-tuning), the EMA
#: state, and the seeds (the random streams continue from the checkpoint, so a new seed would be silently
#: ignored). Resuming with any of them changed is refused unless ``resume_allow_changes=true``; every other
#: key may change and is applied (and logged). The number of ranks and the shard layout are checked from
#: the checkpoint itself.
RESUME_FIXED_KEYS = ("family", "pretrained_model_name_or_path", "revision", "method", "rank", "lora_alpha",
                     "lora_target_modules", "use_ema", "seed", "sampler_seed")
#: The family's guidance when ``guidance_scale`` is left at None (REFERENCE.md section 1.5).
DEFAULT_GUIDANCE = {"flux1": 4.0, "sd3": 3.5, "flux2": 4.0, "mini": 1.0}
DEFAULT_GUIDANCE["flux2-dev"] = 4.0  # Flux2Pipeline's default embedded guidance
DEFAULT_GUIDANCE["z-image"] = 5.0  # ZImagePipeline's default (its own scale: v_c + g (v_c - v_u))
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


def _mini_prompts() -> list[str]:
    from flowbp_train.digits import all_prompts

    return all_prompts()


#: Named prompt sets (``prompts: demo``, ``prompts: mini``): the demo prompts above, and the miniature's
#: 40 prompts (its four templates x ten digits, ``flowbp_train.digits.all_prompts``).
PROMPT_SETS = {"demo": lambda: list(DEMO_PROMPTS), "mini": _mini_prompts}


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
    prompts: Any = "demo"  # a named set ("demo", "mini"), a text file (one prompt per line), or an inline list
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
    resume_allow_changes: bool = False  # resume even if a key of RESUME_FIXED_KEYS changed
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


_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
          list: "a list", type(None): "null"}


def _type_name(tp) -> str:
    if tp is Any:
        return "any"
    args = typing.get_args(tp)
    if args:
        return " or ".join(_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args)
    return _NAMES.get(tp, getattr(tp, "__name__", str(tp)))


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


def _is_str_field(tp) -> bool:
    """``str`` or ``str | None``: values taken verbatim from the command line."""
    if tp is str:
        return True
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    return bool(args) and all(a in (str, type(None)) for a in args)


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value``, read by the key's type: a ``str`` key takes the text verbatim (``mixed_precision=no``
    is ``"no"``; one pair of surrounding quotes is removed; ``null``, ``~`` or nothing is None where the
    key accepts None); any other key parses the text as YAML 1.2 (``learning_rate=1e-5`` is a float,
    ``use_ema=true`` a bool, ``method_options={alpha: 0.2}`` a dict; yes/no/on/off are strings)."""
    from flowbp_train import yamlsafe

    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: expected key=value, got an empty key")
    tp = _HINTS.get(key)
    text = raw.strip()
    if tp is not None and _is_str_field(tp):
        if type(None) in typing.get_args(tp) and text in ("", "null", "Null", "NULL", "~"):
            return key, None
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            text = text[1:-1]
        return key, text
    try:
        return key, yamlsafe.loads(raw) if text != "" else None
    except yamlsafe.YamlError as exc:
        raise ConfigError(f"{key}: cannot read the value {raw!r}: {exc}") from None


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
    """Read a YAML recipe (optional; with its ``base:`` chain, :func:`read_recipe`) and apply overrides
    (``["key=value", ...]`` or a dict)."""
    values: dict[str, Any] = read_recipe(recipe) if recipe is not None else {}
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


#: A recipe's ``base:`` chain: a family's recipes name one base file; a few levels leave room for a
#: user's recipe on top of ours, and a bound stops a runaway chain before the cycle check has to.
MAX_BASE_DEPTH = 8


def read_recipe(recipe: str | os.PathLike, *, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The values of a YAML recipe, its ``base:`` first: ``base: _base.yaml`` names another recipe by a
    path relative to this one's folder; the base's values are read (with its own base, recursively), then
    this recipe's go over them, a mapping (``method_options``, ``reward_kwargs``) merged key by key as
    ``key=value`` overrides are. A missing base, a cycle or a chain deeper than :data:`MAX_BASE_DEPTH` is
    one line naming the recipe. No YAML aliases: a base is a file, and what it sets is visible in it."""
    from flowbp_train import yamlsafe

    path = Path(recipe)
    try:
        loaded = yamlsafe.loads(yamlsafe.read_text(path, max_bytes=yamlsafe.MAX_RECIPE_BYTES)) or {}
    except yamlsafe.YamlError as exc:
        msg = str(exc)
        raise ConfigError(f"recipe: {msg if str(path) in msg else f'{path}: {msg}'}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"recipe: {path} must hold a mapping of keys to values")
    if "base" not in loaded:
        return loaded
    base = loaded.pop("base")
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"base: {path}: expected the path of another recipe, relative to {path.parent}, "
                          f"got {base!r}")
    base_path = path.parent / base
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise ConfigError(f"base: {path}: the recipes name each other as base in a cycle ({names})")
    if len(chain) > MAX_BASE_DEPTH:
        raise ConfigError(f"base: {path}: more than {MAX_BASE_DEPTH} levels of base recipes")
    if not base_path.is_file():
        raise ConfigError(f"base: {path}: no recipe {base!r} (looked for {base_path})")
    values = read_recipe(base_path, _chain=chain)
    for key, value in loaded.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return values


def load_prompts(spec) -> list[str]:
    """The training prompts: a named set (:data:`PROMPT_SETS`: ``"demo"``, ``"mini"``), a text file (one
    per line, blank lines skipped) or a list."""
    if isinstance(spec, str) and spec in PROMPT_SETS:
        return PROMPT_SETS[spec]()
    if isinstance(spec, (list, tuple)):
        if not all(isinstance(p, str) for p in spec):
            raise ConfigError("prompts: an inline list must hold only strings")
        return [p.strip() for p in spec if p.strip()]
    if isinstance(spec, str):
        from flowbp_train import yamlsafe

        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"prompts: expected 'demo', 'mini', a list or a text file; file not found: {spec}")
        try:
            text = yamlsafe.read_text(path, max_bytes=MAX_PROMPTS_BYTES)
        except yamlsafe.YamlError as exc:
            raise ConfigError(f"prompts: {exc}") from None
        return [line.strip() for line in text.splitlines() if line.strip()]
    raise ConfigError(f"prompts: expected 'demo', a list of strings or a text file path, got {type(spec).__name__}")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every value (types, ranges, cross-field rules); raises ConfigError naming the key."""
    from flowbp_kernels import EXECUTORS, METHODS, WindowError, get_method

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
    _need(1 <= cfg.num_steps <= MAX_NUM_STEPS,
          f"num_steps: expected an integer in [1, {MAX_NUM_STEPS}], got {cfg.num_steps}")
    _check_resolution(cfg)
    bad_opts = [k for k in cfg.method_options if not isinstance(k, str)]
    _need(not bad_opts, f"method_options: option names must be strings, got {bad_opts[:1]}")
    try:
        method = get_method(cfg.method, **cfg.method_options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"method_options{_option_key(str(exc), cfg.method_options)}: {exc}") from None
    try:  # the method's own window rules (flowbp_kernels.Method.check)
        method.check(cfg.num_steps)
    except WindowError as exc:
        raise ConfigError(f"{'' if exc.key == 'num_steps' else 'method_options.'}{exc.key}: {exc}") from None
    _need(cfg.loss in ("hinge", "neg"), f"loss: expected 'hinge' or 'neg', got {cfg.loss!r}")
    _need(math.isfinite(cfg.loss_margin), f"loss_margin: expected a finite number, got {cfg.loss_margin}")
    _need(isinstance(cfg.reward, str) and cfg.reward != "", "reward: expected a reward name, got an empty value")
    check_reward(cfg.reward, cfg.reward_kwargs)
    prompts = cfg.prompts
    _need(isinstance(prompts, (str, list)),
          f"prompts: expected 'demo', a list of strings or a text file path, got {type(prompts).__name__}")
    _need(len(load_prompts(prompts)) > 0, f"prompts: no prompts found in {prompts!r}")
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        val = getattr(cfg, key)
        _need(1 <= val <= MAX_BATCH, f"{key}: expected an integer in [1, {MAX_BATCH}], got {val}")
    _need(0 <= cfg.rank <= MAX_LORA_RANK,
          f"rank: expected an integer in [0, {MAX_LORA_RANK}] (0 = full fine-tuning), got {cfg.rank}")
    _need(cfg.lora_alpha is None or (math.isfinite(cfg.lora_alpha) and 0 < cfg.lora_alpha <= MAX_LORA_ALPHA),
          f"lora_alpha: expected null or a number in (0, {MAX_LORA_ALPHA:g}], got {cfg.lora_alpha}")
    _need(math.isfinite(cfg.lora_dropout) and 0 <= cfg.lora_dropout < 1,
          f"lora_dropout: expected a number in [0, 1), got {cfg.lora_dropout}")
    _need(cfg.lora_target_modules is None or (0 < len(cfg.lora_target_modules) <= 1024 and all(
        isinstance(m, str) and m.strip() for m in cfg.lora_target_modules)),
        "lora_target_modules: expected null or a non-empty list of module names")
    for key in ("seed", "sampler_seed"):
        val = getattr(cfg, key)
        _need(0 <= val <= MAX_SEED, f"{key}: expected an integer in [0, {MAX_SEED}], got {val}")
    _need(math.isfinite(cfg.learning_rate) and 0 < cfg.learning_rate <= MAX_LEARNING_RATE,
          f"learning_rate: expected a number in (0, {MAX_LEARNING_RATE:g}], got {cfg.learning_rate}")
    _need(math.isfinite(cfg.adam_epsilon) and 0 < cfg.adam_epsilon <= 1,
          f"adam_epsilon: expected a number in (0, 1], got {cfg.adam_epsilon}")
    for key in ("adam_beta1", "adam_beta2"):
        val = getattr(cfg, key)
        _need(0 <= val < 1, f"{key}: expected a number in [0, 1), got {val}")
    _need(math.isfinite(cfg.adam_weight_decay) and cfg.adam_weight_decay >= 0,
          f"adam_weight_decay: expected a number >= 0, got {cfg.adam_weight_decay}")
    _need(math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0,
          f"max_grad_norm: expected a finite number > 0, got {cfg.max_grad_norm}")
    _need(cfg.lr_scheduler in LR_SCHEDULERS,
          f"lr_scheduler: expected one of {', '.join(LR_SCHEDULERS)}, got {cfg.lr_scheduler!r}")
    _need(0 <= cfg.lr_warmup_steps <= MAX_TRAIN_STEPS,
          f"lr_warmup_steps: expected an integer in [0, {MAX_TRAIN_STEPS}], got {cfg.lr_warmup_steps}")
    _need(1 <= cfg.max_train_steps <= MAX_TRAIN_STEPS,
          f"max_train_steps: expected an integer in [1, {MAX_TRAIN_STEPS}], got {cfg.max_train_steps}")
    _need(0 < cfg.ema_decay < 1, f"ema_decay: expected a number in (0, 1), got {cfg.ema_decay}")
    _need(cfg.mixed_precision in ("no", "bf16"), f"mixed_precision: expected 'no' or 'bf16', got "
          f"{cfg.mixed_precision!r}")
    _need(cfg.guidance_scale is None or (math.isfinite(cfg.guidance_scale) and 0 < cfg.guidance_scale <= MAX_GUIDANCE),
          f"guidance_scale: expected null or a number in (0, {MAX_GUIDANCE:g}], got {cfg.guidance_scale}")
    _need(1 <= cfg.max_nonfinite_steps <= MAX_TRAIN_STEPS,
          f"max_nonfinite_steps: expected an integer in [1, {MAX_TRAIN_STEPS}], got {cfg.max_nonfinite_steps}")
    check_device(cfg.device)
    _need(bool(cfg.output_dir.strip()), "output_dir: expected a folder path, got an empty value")
    _need(not Path(cfg.output_dir).is_file(), f"output_dir: {cfg.output_dir} is a file, expected a folder")
    log_dir = Path(cfg.logging_dir)
    _need(bool(cfg.logging_dir.strip()) and not log_dir.is_absolute() and ".." not in log_dir.parts,
          f"logging_dir: expected a folder name inside output_dir, got {cfg.logging_dir!r}")
    _need(1 <= cfg.checkpointing_steps <= MAX_TRAIN_STEPS,
          f"checkpointing_steps: expected an integer in [1, {MAX_TRAIN_STEPS}], got {cfg.checkpointing_steps}")
    _need(cfg.checkpoints_total_limit is None or cfg.checkpoints_total_limit >= 1,
          f"checkpoints_total_limit: expected null or an integer >= 1, got {cfg.checkpoints_total_limit}")
    _need(cfg.resume_from_checkpoint is None or bool(cfg.resume_from_checkpoint.strip()),
          "resume_from_checkpoint: expected null, 'latest' or a checkpoint folder, got an empty value")
    _need(cfg.report_to in REPORT_TO, f"report_to: expected one of {', '.join(REPORT_TO)}, got {cfg.report_to!r}")
    _need(0 <= cfg.num_sample_images <= MAX_SAMPLE_IMAGES,
          f"num_sample_images: expected an integer in [0, {MAX_SAMPLE_IMAGES}], got {cfg.num_sample_images}")
    _need(1 <= cfg.sample_steps <= MAX_SAMPLE_STEPS,
          f"sample_steps: expected an integer in [1, {MAX_SAMPLE_STEPS}], got {cfg.sample_steps}")
    _need(cfg.max_sequence_length is None or 1 <= cfg.max_sequence_length <= MAX_SEQUENCE_LENGTH,
          f"max_sequence_length: expected null or an integer in [1, {MAX_SEQUENCE_LENGTH}], "
          f"got {cfg.max_sequence_length}")
    return cfg


def _option_key(msg: str, options: dict) -> str:
    """``.name`` of the method option an engine message is about ("flowbp-sparse: late_bias must ...")."""
    head = msg.split(":", 1)[1] if ":" in msg else msg
    named = [k for k in options if isinstance(k, str) and (f" {k} " in f" {head} " or f"'{k}'" in head)]
    return f".{named[0]}" if len(named) == 1 else ""


def _check_resolution(cfg: TrainConfig) -> None:
    """The family's resolution rule (see RESOLUTION_FACTOR), without loading the model."""
    res, fam = cfg.resolution, cfg.family
    if fam in FIXED_RESOLUTION:
        _need(res == FIXED_RESOLUTION[fam], f"resolution: the {fam} family generates "
              f"{FIXED_RESOLUTION[fam]}x{FIXED_RESOLUTION[fam]} images, got {res}")
        return
    factor = RESOLUTION_FACTOR.get(fam, DEFAULT_RESOLUTION_FACTOR)
    _need(factor <= res <= MAX_RESOLUTION and res % factor == 0,
          f"resolution: expected a multiple of {factor} (the {fam} VAE's downsampling x patch size) in "
          f"[{factor}, {MAX_RESOLUTION}], got {res}")


def check_device(spec: str) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` with that GPU present (checked without loading a model)."""
    import re

    import torch

    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    _need(spec in ("auto", "cpu") or m is not None, f"device: expected 'auto', 'cpu' or 'cuda[:N]', got {spec!r}")
    if m is not None:
        _need(torch.cuda.is_available(), f"device: {spec!r} requested but CUDA is not available (use device=cpu)")
        index = int(m.group(1) or 0)
        count = torch.cuda.device_count()
        _need(index < count, f"device: {spec!r} requested but only {count} GPU(s) are visible")


def _reward_target(name: str):
    """What the reward registry builds for ``name`` (the class behind a lazy factory), or None."""
    import importlib

    from flowbp_train.rewards import base as rb

    if name not in rb._REGISTRY:
        try:  # modules that register themselves on import, as get_reward finds them ("mini_judge" -> mini.py)
            for module in dict.fromkeys([name, name.split("_")[0]]):
                if name in rb._REGISTRY or not module.isidentifier():
                    break
                try:
                    importlib.import_module(f"flowbp_train.rewards.{module}")
                except ModuleNotFoundError as e:
                    if e.name != f"flowbp_train.rewards.{module}":
                        raise
        except ImportError as exc:
            raise ConfigError(f"reward: {name!r} cannot be imported ({exc})") from None
    if name not in rb._REGISTRY:
        return None
    factory = rb._REGISTRY[name]
    target = getattr(factory, "lazy_target", None)
    if target is not None:
        module, cls = target
        return getattr(importlib.import_module(f"flowbp_train.rewards.{module}"), cls)
    return factory


def check_reward(name: str, kwargs: dict) -> None:
    """The reward is registered and accepts every key of ``reward_kwargs`` (by its signature)."""
    import inspect

    from flowbp_train.rewards import available_rewards

    target = _reward_target(name)
    _need(target is not None, f"reward: unknown reward {name!r}; available: {', '.join(available_rewards())}")
    bad = [k for k in kwargs if not isinstance(k, str) or not k.isidentifier()]
    _need(not bad, f"reward_kwargs: keys must be argument names, got {bad[0]!r}" if bad else "")
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check against
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY,
                                                   inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for key in kwargs:
        _need(key in names, f"reward_kwargs.{key}: the {name!r} reward takes no such argument; it accepts "
              f"{', '.join(names) or 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind in (
        inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and p.name not in kwargs]
    _need(not missing, f"reward_kwargs.{missing[0]}: required by the {name!r} reward" if missing else "")


def check_lora_targets(module, targets: list | None) -> None:
    """Every name of ``lora_target_modules`` matches at least one module of the built transformer, by
    peft's rule for a list (the full name, or its ending after a dot). Called right after the model is
    built and before any other work (reward loading, LoRA injection), since only then are the names known."""
    if not targets:
        return
    names = [n for n, _ in module.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            leaves = sorted({n.split(".")[-1] for n in names})
            raise ConfigError(f"lora_target_modules: {t!r} matches no module of the {type(module).__name__} "
                              f"(module names end in e.g. {', '.join(leaves[:8])})")


def dump_yaml(cfg: TrainConfig) -> str:
    """The resolved configuration as YAML (what ``--dry-run`` prints and ``output_dir`` keeps)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
