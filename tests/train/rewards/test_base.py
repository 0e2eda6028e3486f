"""The Reward base class, the registry and WeightedSum, against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from flowbp_train.rewards import Reward, WeightedSum, available_rewards, get_reward, register_reward


class MeanReward(Reward):
    """r = scale * mean(image) + (number of words in the prompt); counts text encodings."""

    name = "mean_test"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))
        self.drop = torch.nn.Dropout(0.5)
        self.encodes = 0
        self.freeze()

    def _encode(self, prompts):
        self.encodes += len(prompts)
        return torch.tensor([float(len(p.split())) for p in prompts])

    def _score(self, images, prompts):
        return self.drop(images.mean((1, 2, 3))) * self.scale + self.cached_text(prompts, self._encode)


def test_registry_and_lazy_builtins():
    register_reward("mean_test", MeanReward, overwrite=True)
    r = get_reward("mean_test", scale=3.0)
    assert isinstance(r, MeanReward) and float(r.scale) == 3.0
    assert {"hpsv2", "pickscore", "imagereward", "aesthetic", "clipscore", "mean_test"} <= set(available_rewards())
    with pytest.raises(ValueError, match="already registered"):
        register_reward("mean_test", lambda: MeanReward())
    with pytest.raises(ValueError, match="unknown reward"):
        get_reward("no_such_reward")
    with pytest.raises(TypeError, match="factory"):
        register_reward("bad", 3)


def test_frozen_eval_and_text_cache():
    r = MeanReward(2.0)
    r.train()
    assert not r.training and not r.drop.training and not any(p.requires_grad for p in r.parameters())
    x = torch.rand(3, 3, 4, 5, requires_grad=True)
    out = r.score(x, ["a b", "c", "a b"])
    ref = 2.0 * x.detach().double().mean((1, 2, 3)) + torch.tensor([2.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    r.score(x, ["c", "a b", "d e f"])
    assert r.encodes == 3  # "a b", "c", "d e f": each distinct prompt encoded once
    out.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 / (3 * 4 * 5)))


def test_weighted_sum_matches_manual():
    a, b = MeanReward(1.0), MeanReward(-2.0)
    ws = WeightedSum([a, b], weights=[0.5, 2.0], normalization=[(1.0, 2.0), (-0.5, 4.0)])
    x = torch.rand(2, 3, 4, 4)
    p = ["x y", "z"]
    ra, rb = a.score(x, p).double(), b.score(x, p).double()
    ref = 0.5 * (ra - 1.0) / 2.0 + 2.0 * (rb + 0.5) / 4.0
    torch.testing.assert_close(ws.score(x, p).double(), ref, rtol=1e-6, atol=1e-6)
    assert set(ws.components(x, p)) == {"mean_test", "mean_test_1"}
    with pytest.raises(ValueError, match="weights"):
        WeightedSum([a, b], weights=[1.0])
    with pytest.raises(ValueError, match="std"):
        WeightedSum([a], normalization=[(0.0, 0.0)])
    with pytest.raises(TypeError, match="rewards"):
        WeightedSum([a, torch.nn.Linear(1, 1)])


@pytest.mark.parametrize("images,prompts,exc,match", [
    (torch.rand(2, 3, 4, 4).numpy(), ["a", "b"], TypeError, "images"),
    (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), ["a", "b"], TypeError, "images"),
    (torch.rand(2, 4, 4, 4), ["a", "b"], ValueError, "images"),
    (torch.rand(3, 4, 4), ["a"], ValueError, "images"),
    (torch.rand(2, 3, 4, 4), ["a"], ValueError, "prompts"),
    (torch.rand(2, 3, 4, 4), "ab", TypeError, "prompts"),
    (torch.rand(2, 3, 4, 4), ["a", 1], TypeError, "prompts"),
])
def test_bad_inputs_raise(images, prompts, exc, match):
    with pytest.raises(exc, match=match):
        MeanReward().score(images, prompts)


def test_check_reward_finds_the_files_without_loading_them(tmp_path):
    """``check_reward_files`` answers "are the files there?" from the paths alone (an empty file passes: nothing
    is read) and names the option with the caller's prefix."""
    import importlib.util

    from flowbp_train.rewards import check_reward_files

    (tmp_path / "HPS_v2.1_compressed.pt").write_bytes(b"")
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(ImportError, match="open_clip"):
            check_reward_files("hpsv2", checkpoint_path=str(tmp_path))
    else:
        check_reward_files("hpsv2", checkpoint_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"^reward_kwargs\.mlp_path: .*reward_kwargs\.allow_download=true"):
        check_reward_files("aesthetic", key_prefix="reward_kwargs.")
    with pytest.raises(FileNotFoundError, match=r"^--reward pickscore:processor_path: "):
        (tmp_path / "clip").mkdir()
        (tmp_path / "clip" / "config.json").write_text("{}")
        check_reward_files("pickscore", key_prefix="--reward pickscore:", model_path=str(tmp_path / "clip"),
                     processor_path=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match="unknown reward"):
        check_reward_files("no-such-reward")
