"""flowbp-eval end to end on a tiny dummy FlowAdapter and tiny rewards: files, CSV/JSON contents (against
numpy on the saved PNGs), per-prompt seeds, resume, comparison, and the CLI."""

from __future__ import annotations

import csv
import json
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_train import evaluate as ev
from flowbp_train.models.base import FlowAdapter, PromptBatch
from flowbp_train.rewards import Reward, register_reward

PROMPTS = ["a cat", "a red house by the sea", "two dogs", "an apple", "night sky with stars"]


class DummyAdapter(FlowAdapter):
    """Latents [B, 4, 6, 6]; velocity = small conv of x plus a prompt embedding; decode = sigmoid(conv)."""

    family = "dummy"

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.transformer = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.vae = torch.nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for p in [*self.transformer.parameters(), *self.vae.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.velocity_calls = 0  # number of images for which a velocity was evaluated (summed over steps)

    def encode_prompts(self, prompts):
        emb = torch.stack([torch.full((4, 1, 1), (zlib.crc32(p.encode()) % 1000) / 500 - 1.0) for p in prompts])
        return PromptBatch(list(prompts), {"emb": emb})

    def initial_noise(self, batch_size, generator=None):
        return torch.randn(batch_size, 4, 6, 6, generator=generator)

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)

    def velocity_fn(self, batch, sigmas, *, grad_negative=False):
        def v(x, i):
            self.velocity_calls += x.shape[0]
            return self.transformer(x) + batch.tensors["emb"] - x

        return v

    def decode(self, latents):
        return torch.sigmoid(self.vae(latents))


class Brightness(Reward):
    """Mean pixel value; counts scored images."""

    name = "brightness"

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.freeze()

    def _score(self, images, prompts):
        self.calls += images.shape[0]
        return images.mean((1, 2, 3))


class RedPerWord(Reward):
    """Red-channel mean times the number of words of the prompt."""

    name = "redword"

    def _score(self, images, prompts):
        return images[:, 0].mean((1, 2)) * torch.tensor([len(p.split()) for p in prompts], dtype=images.dtype)


def _png(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64) / 255


def _rows(out):
    with (out / "scores.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_files_and_contents(tmp_path):
    out = tmp_path / "run"
    summary = ev.evaluate(DummyAdapter(), PROMPTS, [Brightness(), RedPerWord()], out, num_steps=4, seed=10,
                          batch_size=2, progress=False)
    for f in ["scores.csv", "summary.json", "grid.png", *[f"images/{i:05d}.png" for i in range(5)]]:
        assert (out / f).is_file(), f
    rows = _rows(out)
    assert [int(r["index"]) for r in rows] == list(range(5)) and [r["prompt"] for r in rows] == PROMPTS
    assert [int(r["seed"]) for r in rows] == [10 + i for i in range(5)]
    # Scores are those of the saved PNG (numpy reference on the file).
    for r in rows:
        img = _png(out / r["image"])
        assert img.shape == (6, 6, 3)
        np.testing.assert_allclose(float(r["brightness"]), img.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(r["redword"]), img[..., 0].mean() * len(r["prompt"].split()), rtol=1e-6)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for k in ["brightness", "redword"]:
        v = np.array([float(r[k]) for r in rows])
        s = on_disk["rewards"][k]
        assert s["n"] == 5
        np.testing.assert_allclose(s["mean"], v.mean(), rtol=1e-12)
        np.testing.assert_allclose(s["stderr"], v.std(ddof=1) / np.sqrt(5), rtol=1e-12)
    assert Image.open(out / "grid.png").size == (3 * 6, 2 * 6)  # 5 images -> 3 columns, 2 rows


def test_images_depend_only_on_prompt_and_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ev.evaluate(DummyAdapter(), PROMPTS, [Brightness()], a, num_steps=3, seed=1, batch_size=1, progress=False)
    ev.evaluate(DummyAdapter(), PROMPTS, [Brightness()], b, num_steps=3, seed=1, batch_size=3, progress=False)
    for i in range(5):
        # batch composition may move float rounding by one 8-bit level at most
        assert np.abs(_png(a / f"images/{i:05d}.png") - _png(b / f"images/{i:05d}.png")).max() <= 1 / 255 + 1e-9


def test_resume_skips_scored_prompts(tmp_path):
    out = tmp_path / "run"
    ev.evaluate(DummyAdapter(), PROMPTS[:3], [Brightness()], out, num_steps=4, progress=False)
    first = _rows(out)
    adapter, reward = DummyAdapter(), Brightness()
    ev.evaluate(adapter, PROMPTS, [reward], out, num_steps=4, progress=False)
    assert adapter.velocity_calls == 2 * 4 and reward.calls == 2  # only the two new prompts
    rows = _rows(out)
    assert rows[:3] == first and len(rows) == 5
    # A missing score with its image on disk is re-scored from the PNG, without sampling.
    rows[1]["brightness"] = ""
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    adapter, reward = DummyAdapter(), Brightness()
    ev.evaluate(adapter, PROMPTS, [reward], out, num_steps=4, progress=False)
    assert adapter.velocity_calls == 0 and reward.calls == 1
    # same PNG, same score up to float32 summation order (batch of 1 now, of 3 before)
    assert float(_rows(out)[1]["brightness"]) == pytest.approx(float(first[1]["brightness"]), rel=1e-6)
    # A changed seed invalidates the stored rows.
    adapter = DummyAdapter()
    for p in (out / "images").iterdir():
        p.unlink()
    ev.evaluate(adapter, PROMPTS, [Brightness()], out, num_steps=4, seed=5, progress=False)
    assert adapter.velocity_calls == 5 * 4


def test_compare_runs(tmp_path):
    a, b = tmp_path / "base", tmp_path / "tuned"
    ev.evaluate(DummyAdapter(0), PROMPTS, [Brightness()], a, num_steps=2, progress=False)
    ev.evaluate(DummyAdapter(1), PROMPTS, [Brightness(), RedPerWord()], b, num_steps=2, progress=False,
                compare_with=[a])
    table = (b / "comparison.md").read_text()
    sa = json.loads((a / "summary.json").read_text())["rewards"]["brightness"]
    assert "| base | 5 |" in table and "| tuned | 5 |" in table
    assert f"{sa['mean']:.4f} ± {sa['stderr']:.4f}" in table
    base_line = next(ln for ln in table.splitlines() if ln.startswith("| base |"))
    assert base_line.endswith("| - |")  # base was not scored with redword
    assert (b / "comparison.png").stat().st_size > 0


def test_cli(tmp_path, capsys):
    from flowbp_train.models import register_adapter

    register_adapter("dummy_eval", lambda path, **kw: DummyAdapter())
    register_reward("brightness_eval", Brightness, overwrite=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# header\n" + "\n".join(PROMPTS[:3]) + "\n\n")
    out = tmp_path / "cli"
    rc = ev.main(["--family", "dummy_eval", "--model", "x", "--prompts", str(prompts), "--reward", "brightness_eval",
                  "--output-dir", str(out), "--num-steps", "2", "--no-progress", "--device", "cpu"])
    assert rc == 0 and len(_rows(out)) == 3
    assert json.loads((out / "summary.json").read_text())["rewards"]["brightness_eval"]["n"] == 3
    assert ev.main(["compare", str(out), str(out), "--output-dir", str(tmp_path / "cmp")]) == 0
    assert "| cli | 3 |" in capsys.readouterr().out


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="adapter"):
        ev.evaluate(object(), PROMPTS, [Brightness()], tmp_path)
    with pytest.raises(ValueError, match="prompts"):
        ev.evaluate(DummyAdapter(), [], [Brightness()], tmp_path)
    with pytest.raises(ValueError, match="rewards"):
        ev.evaluate(DummyAdapter(), PROMPTS, [Brightness(), Brightness()], tmp_path)
    with pytest.raises(ValueError, match="num_steps"):
        ev.evaluate(DummyAdapter(), PROMPTS, [Brightness()], tmp_path, num_steps=0)
    with pytest.raises(FileNotFoundError, match="prompts"):
        ev.load_prompts(tmp_path / "none.txt")
    with pytest.raises(FileNotFoundError, match="summary.json"):
        ev.compare_runs([tmp_path], tmp_path)
    assert ev.parse_reward_spec("hpsv2:checkpoint_path=/w/a.pt,w=2.5") == ("hpsv2", {"checkpoint_path": "/w/a.pt",
                                                                                     "w": 2.5})
    with pytest.raises(ValueError, match="--reward"):
        ev.parse_reward_spec("hpsv2:oops")


def test_the_evaluation_protocol_of_each_family():
    """flowbp-eval's defaults are the authors' protocol (REFERENCE.md 6.1): SD3.5 40 steps at CFG 3.5,
    FLUX.1 and FLUX.2 50 steps at guidance 4.0, 512 px in bf16; a given value wins."""
    from flowbp_train.evaluate import protocol

    want = {"sd3": (40, 3.5), "flux1": (50, 4.0), "flux2": (50, 4.0)}
    for family, (steps, guidance) in want.items():
        got = protocol(family)
        assert (got["num_steps"], got["guidance_scale"], got["resolution"], got["dtype"]) == (steps, guidance, 512,
                                                                                              "bf16")
    assert protocol("sd3", num_steps=8, guidance_scale=None)["num_steps"] == 8
    assert protocol("sd3", guidance_scale=None)["guidance_scale"] == 3.5
    assert protocol("mini")["resolution"] == 16
