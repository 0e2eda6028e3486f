"""Configuration and CLI: one-line errors naming the key, before anything loads; every recipe resolves."""

from __future__ import annotations

import pytest

from flowbp_train.cli import train_main
from flowbp_train.config import ConfigError, TrainConfig, load_config, load_prompts

from helpers import ROOT

#: the runnable recipes (``_base.yaml`` files hold what a family's recipes share)
RECIPES = sorted(p for fam in ("flux1", "sd3", "flux2") for p in (ROOT / "recipes" / fam).glob("*.yaml")
                 if not p.name.startswith("_"))
OK = ["pretrained_model_name_or_path=/models/x"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["lerning_rate=1e-4"], "lerning_rate"),  # unknown key
        (["rank=two"], "rank"),  # wrong type
        (["learning_rate=[1]"], "learning_rate"),
        (["use_ema=1"], "use_ema"),  # an int is not a bool
        (["num_steps=2", "method=flowbp-sparse", "method_options.num_active=3"], "method_options.num_active"),
        (["num_steps=2", "method=flowbp-lagrange"], "num_steps"),  # window too short for a Lagrange leap
        (["method=nope"], "method"),
        (["method_options={alpha: -1}"], "method_options"),
        (["prompts=[]"], "prompts"),  # no prompts
        (["prompts=/does/not/exist.txt"], "prompts"),
        (["family=sdxl"], "family"),
        (["mixed_precision=fp16"], "mixed_precision"),
        (["executor=lazy"], "executor"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, OK + overrides)
    msg = str(err.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_missing_model_path():
    with pytest.raises(ConfigError, match=r"^pretrained_model_name_or_path: missing"):
        load_config(None, [])


def test_empty_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("\n  \n")
    with pytest.raises(ConfigError, match="^prompts: no prompts"):
        load_config(None, OK + [f"prompts={f}"])
    f.write_text("a cat\n\n a dog \n")
    assert load_prompts(str(f)) == ["a cat", "a dog"]


def test_overrides_merge_into_recipe_dicts(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: flowbp-bridge\nmethod_options: {num_active: 4, alpha: 0.1}\n")
    cfg = load_config(recipe, OK + ["method_options.alpha=0.5", "lora_alpha=8"])
    assert cfg.method_options == {"num_active": 4, "alpha": 0.5}
    assert cfg.lora_alpha == 8.0 and isinstance(cfg.lora_alpha, float)
    assert TrainConfig().effective_guidance == 4.0  # FLUX.1 default guidance embedding


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_recipe_resolves(recipe, capsys):
    assert train_main([str(recipe), "pretrained_model_name_or_path=/models/x", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"method: {recipe.stem}" in out and f"family: {recipe.parent.name}" in out


def test_recipes_resolve_as_recorded():
    """Every recipe resolves to exactly the configuration it resolved to before the recipes were given
    base files (``recipes_resolved.json``, recorded by ``helpers.recipes``). A named
    prompt set stands for its list (the miniature's 40 prompts were written out before ``prompts: mini``),
    so prompts are compared as the lists the run trains on; every other value as it is."""
    import json

    from helpers.recipes import FIXTURE, resolve_all

    recorded, now = json.loads(FIXTURE.read_text()), resolve_all()
    # the 36 recipes of main before issue 14, then each family's nine as it was added, and the miniature
    # study's 18 task recipes, recorded as full copies before they were given ``base: ../<method>.yaml``
    assert len(recorded) >= 54 and set(recorded) == set(now), sorted(set(recorded) ^ set(now))
    for name, want in recorded.items():
        got = dict(now[name])
        want = dict(want)
        want["prompts"], got["prompts"] = load_prompts(want["prompts"]), load_prompts(got["prompts"])
        assert got == want, name
    name = "recipes/mini/flowbp-lagrange.yaml"
    assert now[name]["prompts"] == "mini" and recorded[name]["prompts"] == load_prompts("mini")


def test_recipe_base_chain(tmp_path, capsys):
    """``base:`` names another recipe relative to this one; the base's values come first, a mapping is
    merged key by key; a missing base, a cycle or a chain too deep is one line naming ``base``."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text("family: sd3\nlearning_rate: 1.0e-4\nmethod_options: {alpha: 0.1, tau: 0.2}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../root.yaml\nrank: 8\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nmethod: leapalign\nmethod_options: {tau: 0.3}\n"
                                                "learning_rate: 2.0e-4\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", OK)
    assert (cfg.family, cfg.rank, cfg.method, cfg.learning_rate) == ("sd3", 8, "leapalign", 2e-4)
    assert cfg.method_options == {"alpha": 0.1, "tau": 0.3}
    assert train_main([str(tmp_path / "sub" / "leaf.yaml"), *OK, "--dry-run"]) == 0
    out = capsys.readouterr().out  # the fully resolved recipe, base values included, no base key
    assert "family: sd3" in out and "rank: 8" in out and "base:" not in out
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    (tmp_path / "bad.yaml").write_text("base: [a.yaml]\n")
    for i in range(12):
        (tmp_path / f"c{i}.yaml").write_text(f"base: c{i + 1}.yaml\n")
    (tmp_path / "c12.yaml").write_text("rank: 4\n")
    for name, needle in (("a.yaml", "cycle"), ("self.yaml", "cycle"), ("lost.yaml", "no recipe 'nowhere.yaml'"),
                         ("bad.yaml", "expected the path"), ("c0.yaml", "levels of base")):
        with pytest.raises(ConfigError) as err:
            load_config(tmp_path / name, OK)
        msg = str(err.value)
        assert msg.startswith("base: ") and needle in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="^base: unknown key"):
        load_config(None, [*OK, "base=x.yaml"])  # a loader key, not a setting


def test_recipes_cover_every_method_and_family():
    from flowbp_kernels import METHODS

    for fam in ("flux1", "sd3", "flux2"):
        assert {p.stem for p in RECIPES if p.parent.name == fam} == set(METHODS)


def test_cli_error_is_one_line_and_exit_2(capsys):
    recipe = ROOT / "recipes" / "flux1" / "flowbp-lagrange.yaml"
    assert train_main([str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowbp-train: error: pretrained_model_name_or_path") and "\n" not in err


def test_overrides_are_read_by_the_key_type(tmp_path):
    """The README's values work: no YAML 1.1 surprises (no -> False, 1e-5 -> str, 017 -> 15, dates)."""
    cfg = load_config(None, OK + ["learning_rate=1e-5", "mixed_precision=no", "use_ema=true", "seed=017",
                                  "output_dir=/runs/2024-01-02", "revision='main'", "resume_from_checkpoint=null",
                                  "method_options={alpha: 0.2, tau: 1e-1}", "reward_kwargs.version=v2.1",
                                  "tracker_project_name=yes"])
    assert cfg.learning_rate == 1e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.mixed_precision == "no" and cfg.use_ema is True and cfg.seed == 17
    assert cfg.output_dir == "/runs/2024-01-02" and cfg.revision == "main" and cfg.resume_from_checkpoint is None
    assert cfg.method_options == {"alpha": 0.2, "tau": 0.1} and cfg.reward_kwargs == {"version": "v2.1"}
    assert cfg.tracker_project_name == "yes"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("mixed_precision: no\nlearning_rate: 1e-5\nprompts: [on, off, 2024-01-02]\nseed: 010\n")
    cfg = load_config(recipe, OK)
    assert cfg.mixed_precision == "no" and cfg.learning_rate == 1e-5 and cfg.seed == 10
    assert cfg.prompts == ["on", "off", "2024-01-02"]
