"""The miniature's tests need diffusers (its transformer), scikit-learn (its data), safetensors and peft."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers", reason="the miniature needs diffusers")
pytest.importorskip("sklearn", reason="the miniature's data ships with scikit-learn")
pytest.importorskip("safetensors", reason="the miniature's weights are safetensors")
pytest.importorskip("peft", reason="the miniature's LoRA uses peft")
