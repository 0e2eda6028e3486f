"""Registry of model adapters: one family name -> one :class:`FlowAdapter` subclass, imported lazily.

``build_adapter(family, pretrained_model_name_or_path, **kw)`` calls the class's
``from_pretrained(pretrained_model_name_or_path, **kw)``. The trainer passes these keywords (an adapter
ignores the ones it does not use): ``resolution``, ``guidance_scale``, ``device``, ``dtype``
(transformer dtype), ``revision``, ``max_sequence_length``. Entries are ``"module:ClassName"`` strings so
that importing the registry never imports diffusers; ``register_adapter`` adds a family (or a factory).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from flowbp_train.models.base import FlowAdapter, PromptBatch

#: family -> "module:ClassName" (lazy) or a factory ``f(pretrained_model_name_or_path, **kw)``.
ADAPTERS: dict[str, str | Callable[..., FlowAdapter]] = {
    "flux1": "flowbp_train.models.flux:FluxAdapter",
    "sd3": "flowbp_train.models.sd3:SD3Adapter",
    "flux2": "flowbp_train.models.flux2:Flux2Adapter",
    "mini": "flowbp_train.models.mini:MiniAdapter",
}
ADAPTERS["flux2-dev"] = "flowbp_train.models.flux2_dev:Flux2DevAdapter"
ADAPTERS["z-image"] = "flowbp_train.models.zimage:ZImageAdapter"


def register_adapter(family: str, adapter: str | type | Callable[..., FlowAdapter]) -> None:
    """Register a family: a ``"module:ClassName"`` string, a :class:`FlowAdapter` subclass (its
    ``from_pretrained`` is used) or a factory ``f(pretrained_model_name_or_path, **kw) -> FlowAdapter``."""
    if not isinstance(family, str) or not family:
        raise ValueError(f"family must be a non-empty string, got {family!r}")
    if not (isinstance(adapter, str) or callable(adapter)):
        raise TypeError(f"adapter must be a 'module:Class' string or a callable, got {type(adapter).__name__}")
    ADAPTERS[family] = adapter


def adapter_class(family: str):
    """The class (or factory) registered for ``family``, importing its module on first use."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; registered: {', '.join(sorted(ADAPTERS))}")
    entry = ADAPTERS[family]
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        entry = getattr(importlib.import_module(module), name)
        ADAPTERS[family] = entry
    return entry


def build_adapter(family: str, pretrained_model_name_or_path: str, **kw) -> FlowAdapter:
    """Load the family's pipeline from ``pretrained_model_name_or_path`` and wrap it in its adapter."""
    entry = adapter_class(family)
    factory = entry.from_pretrained if isinstance(entry, type) else entry
    adapter = factory(pretrained_model_name_or_path, **kw)
    if not isinstance(adapter, FlowAdapter):
        raise TypeError(f"the {family!r} adapter factory returned {type(adapter).__name__}, not a FlowAdapter")
    return adapter


__all__ = ["ADAPTERS", "FlowAdapter", "PromptBatch", "adapter_class", "build_adapter", "register_adapter"]
