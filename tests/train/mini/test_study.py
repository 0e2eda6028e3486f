"""A 2-step smoke of the miniature study (``benchmarks/mini_study.py``'s logic) through the real trainer:
every output written, the exact gradient's decomposition summing to it, each method's pieces summing to
its gradient, the trainer's log carrying the task's terms, a resumed study keeping its journal's jobs, and the
inputs checked before any work."""

from __future__ import annotations

import json

import pytest

from flowbp_train.mini import study as S


def test_two_step_study_smoke(tmp_path):
    cfg = S.StudyConfig(steps=2, seeds=1, tasks=["shift"], methods=["flowbp-lagrange", "refl"], draws=1,
                        eval_per_prompt=2, batch_size=4)
    out = S.run_study(cfg, workers=1, out_dir=tmp_path, markdown=tmp_path / "study.md", log=lambda *_: None)
    for name in ("study.json", "curves.png", "decomposition.png", "study.md"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["info"]["steps"] == 2 and saved["info"]["eval_steps"] == [0, 2]
    rows = out["aggregate"]["shift"]["methods"]
    assert set(rows) == {"flowbp-lagrange", "refl"} and out["aggregate"]["shift"]["order"]
    for r in rows.values():
        for key in ("final_reward", "gain", "auc", "term_log_p", "term_position", "judge", "judge_recentred",
                    "diversity", "ink_cx", "cos_vs_exact", "saved_bytes_streaming", "saved_bytes_retain"):
            assert r[key] is not None, key
        assert -1 <= r["cos_vs_exact"][0] <= 1 and r["saved_bytes_streaming"][0] > 0
    (grads,) = out["gradients"]
    full = grads["methods"]["full"]
    assert full["cos_vs_exact"] == pytest.approx(1.0, abs=1e-12)  # the exact gradient against itself
    assert set(full["steps"]) == {str(i) for i in range(10)}  # full backprop reaches every rollout step
    for name, m in grads["methods"].items():
        # float64 sums of float32 pieces: the pieces account for the whole gradient
        assert m["pieces_rel_err"] < 1e-5, name
    assert set(grads["methods"]["refl"]["steps"]) <= {str(i) for i in range(10)}
    (run,) = [r for r in out["runs"] if r["method"] == "flowbp-lagrange"]
    for rec in run["train"]:  # the trainer logs each term; for a pinned method they add up to the reward
        assert rec["reward"] == pytest.approx(rec["reward_log_p"] + rec["reward_position"], rel=1e-5, abs=1e-5)
    text = (tmp_path / "study.md").read_text()
    assert "### Task shift" in text and "re-centred judge" in text and "exact (full)" in text
    assert "vs refl (sd)" in text and "add up to each method's own gradient" in text
    # the journal holds every finished job: a resumed study runs none of them again, aggregates the same
    lines = (tmp_path / S.JOURNAL).read_text().splitlines()
    assert len(lines) == 1 + len(out["runs"]) + len(out["gradients"]) == 4
    again = S.run_study(cfg, workers=1, out_dir=tmp_path, log=lambda *_: None, resume=True)
    assert again["info"]["kept_jobs"] == 3 and again["aggregate"] == out["aggregate"]
    fewer = S.StudyConfig(**{**cfg.__dict__, "methods": ["refl"]})  # a journal serves a smaller study too
    part = S.run_study(fewer, workers=1, out_dir=tmp_path, log=lambda *_: None, resume=True)
    assert part["info"]["kept_jobs"] == 2 and set(part["aggregate"]["shift"]["methods"]) == {"refl"}
    assert len((tmp_path / S.JOURNAL).read_text().splitlines()) == 4  # the journal keeps every job it had
    more = S.StudyConfig(**{**cfg.__dict__, "seeds": 2})  # a stopped study reported: the missing jobs named
    rep = S.run_study(more, workers=1, out_dir=tmp_path, log=lambda *_: None, resume=True, run=False)
    assert rep["info"]["kept_jobs"] == 3 and len(rep["info"]["missing_jobs"]) == 3
    assert "train/shift/refl/1" in rep["info"]["missing_jobs"] and len(rep["runs"]) == 2


def test_study_inputs_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="tasks: unknown task 'nope'"):
        S.run_study(S.StudyConfig(tasks=["nope"]), workers=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="methods: unknown method"):
        S.run_study(S.StudyConfig(methods=["sgd"]), workers=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="steps"):
        S.run_study(S.StudyConfig(steps=0), workers=1, out_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="recipes_root"):
        S.run_study(S.StudyConfig(recipes_root=str(tmp_path)), workers=1, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())
    assert S.eval_steps(50) == [0, 5, 10, 20, 30, 40, 50] and S.eval_steps(2) == [0, 2]
