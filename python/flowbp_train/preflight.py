"""Find every file a run needs before anything heavy loads (``flowbp-train`` calls it before the trainer).

The prompts file, the model folder (or the cached snapshot of a model id) with its ``model_index.json``
and each component's config and weights (the adapter's ``check_files``), the names of a user-given
``lora_target_modules`` against the folder's transformer built on the meta device, and the reward's
weight files and optional packages (``flowbp_train.rewards.check_reward_files``). A missing file stops
the run in seconds with one line naming the key (``reward_kwargs.checkpoint_path: ...``).
"""

from __future__ import annotations

from pathlib import Path

from flowbp_train.config import PROMPT_SETS, ConfigError, TrainConfig, check_lora_targets


def preflight(cfg: TrainConfig, *, model: bool = True, reward: bool = True) -> None:
    """Find every file the run needs before anything heavy is loaded: the prompts file, the model folder
    (or cached model id) with each component's config and weights, the reward's weight files and optional
    packages. Raises :class:`ConfigError` with one line naming the key (``reward_kwargs.checkpoint_path``)."""
    if isinstance(cfg.prompts, str) and cfg.prompts not in PROMPT_SETS and not Path(cfg.prompts).is_file():
        raise ConfigError(f"prompts: file not found: {cfg.prompts}")
    if model:
        from flowbp_train.models import adapter_class

        check = getattr(adapter_class(cfg.family), "check_files", None)
        try:
            folder = check(cfg.pretrained_model_name_or_path, revision=cfg.revision) if callable(check) else None
        except (OSError, ValueError) as exc:  # the messages start with the key
            raise ConfigError(_one_line(exc)) from None
        if folder is not None and cfg.rank and cfg.lora_target_modules:  # names against the real module tree
            from flowbp_train.models.files import meta_transformer

            check_lora_targets(meta_transformer(folder), cfg.lora_target_modules)
    if reward:
        from flowbp_train.rewards import check_reward_files

        try:
            check_reward_files(cfg.reward, key_prefix="reward_kwargs.", **cfg.reward_kwargs)
        except (OSError, ImportError, ValueError, TypeError) as exc:
            msg = _one_line(exc).removeprefix("name: ")
            raise ConfigError(msg if msg.startswith("reward") else f"reward: {msg}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
