"""`flowbp-eval` end to end on the miniature: sample with and without the trained LoRA, score with the
training reward and the held-out judge, and compare the two runs."""

import csv
import json

import numpy as np

from flowbp_train.evaluate import main as eval_main


def test_flowbp_eval_on_the_miniature(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit three\ndigit seven\n")
    base = tmp_path / "base"
    args = ["--family", "mini", "--model", "mini", "--prompts", str(prompts), "--reward", "mini",
            "--reward", "mini_judge", "--num-steps", "4", "--seed", "3"]
    assert eval_main([*args, "--output-dir", str(base)]) == 0
    summary = json.loads((base / "summary.json").read_text())
    with open(base / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == ["a handwritten digit three", "digit seven"]
    vals = np.array([float(r["mini"]) for r in rows])
    assert abs(summary["rewards"]["mini"]["mean"] - vals.mean()) < 1e-9
    assert abs(summary["rewards"]["mini"]["stderr"] - vals.std(ddof=1) / np.sqrt(2)) < 1e-9
    assert all(v <= 0 for v in vals)  # log-probabilities
    assert (base / "grid.png").is_file() and len(list((base / "images").glob("*.png"))) == 2
    # a rerun resumes: nothing to sample, same scores
    assert eval_main([*args, "--output-dir", str(base)]) == 0
    assert json.loads((base / "summary.json").read_text())["rewards"] == summary["rewards"]
