"""Fixtures of the user-path suite: a tiny complete diffusers folder per family (real tokenizers and text
encoders, saved with save_pretrained) and a tiny CLIP reward folder, built once per test session."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("peft")

from helpers import folders as tiny_folders  # noqa: E402


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """``{"flux1", "sd3", "flux2", "clip", "prompts"} -> Path``, written once per session."""
    return tiny_folders.build_all(tmp_path_factory.mktemp("models"))
