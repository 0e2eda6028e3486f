"""2-step smoke of the miniature's main job as the quick start runs it: ``flowbp-train
recipes/mini/flowbp-lagrange.yaml`` (the trainer, as for every family), then ``flowbp-mini report``, then
``flowbp-eval`` on the LoRA; plus the study's measurement helpers against hand-counted references."""

from __future__ import annotations

import json

import torch

from helpers import ROOT


def test_trainer_main_job_two_steps(tmp_path):
    from flowbp_train import cli

    rc = cli.train_main([str(ROOT / "recipes/mini/flowbp-lagrange.yaml"), "max_train_steps=2",
                         "train_batch_size=4", "checkpointing_steps=1", f"output_dir={tmp_path}"])
    assert rc in (0, None)
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "grid_before_after.png").exists()  # the report is a command of its own
    from flowbp_train.mini.cli import main

    assert main(["report", str(tmp_path)]) == 0
    for name in ("grid_before_after.png", "grid_before.png", "grid_after.png", "curves.png", "summary.json"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method"] == "flowbp-lagrange" and summary["config"]["max_train_steps"] == 2
    # held-out curve: the base model (step 0) and the two checkpoints
    assert [h["step"] for h in summary["history"] if "eval_judge" in h] == [0, 1, 2]
    assert [h["step"] for h in summary["history"] if "train_reward" in h] == [1, 2]
    assert -30 < summary["after"]["reward"] <= 0 and 0 <= summary["after"]["judge"] <= 1
    from PIL import Image

    grid = Image.open(tmp_path / "grid_before.png")
    assert grid.size == (8 * 65 + 1, 10 * 65 + 1)  # 8 seeds x 10 digits of 64 px plus 1 px gaps

    # flowbp-eval loads the LoRA through MiniAdapter.load_lora_weights and scores with both mini rewards
    from flowbp_train import evaluate

    (tmp_path / "prompts.txt").write_text("digit one\ndigit two\n")
    evaluate.main(["--family", "mini", "--model", "mini", "--lora", str(tmp_path), "--prompts",
                   str(tmp_path / "prompts.txt"), "--reward", "mini", "--reward", "mini_judge", "--output-dir",
                   str(tmp_path / "eval"), "--num-steps", "4", "--device", "cpu", "--no-progress"])
    ev = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert ev["rewards"]["mini"]["n"] == 2 and 0 <= ev["rewards"]["mini_judge"]["mean"] <= 1


def test_saved_bytes_meter_counts_saved_tensors():
    from flowbp_train.mini.measure import saved_bytes_meter

    w = torch.randn(64, 32, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    with saved_bytes_meter([w]) as stats:
        h = x.exp()        # exp saves its output: 8 x 64 floats
        y = (h @ w).sum()  # mm saves h (same storage as exp's output, counted again) and w (excluded)
    assert stats["total"] == 2 * 8 * 64 * 4
    assert stats["peak"] == stats["total"]
    del h, y
    assert stats["live"] == 0  # freed with the graph


def test_step_scaled_options_only_touch_refl():
    from flowbp_kernels import METHODS
    from flowbp_train.mini.measure import step_scaled_options

    assert step_scaled_options("refl", 10) == {"last_n": 4}  # round(11 * 10 / 25)
    assert step_scaled_options("refl", 25) == {"last_n": 11}
    assert all(step_scaled_options(m, 10) == {} for m in METHODS if m != "refl")
