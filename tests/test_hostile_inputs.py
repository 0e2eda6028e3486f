"""Hostile and careless inputs: every one gets a one-line error naming the key or argument, before any work.

Over 200 bad inputs through the three command lines (``flowbp-train``, ``flowbp-eval``, ``flowbp-mini``;
called in process for the bulk, with a model builder that fails the test if it is ever called, and as real
subprocesses for a sample), recipes (binary, aliases / billion laughs, deep nesting, oversized) and the
public engine API (``rollout``, ``reward_backprop``, ``get_method``, plans, ``flow_sigmas``), where the
velocity function counts its calls: an error must come before the first model call and leave no gradient.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

import flowbp_kernels as fb
from flowbp_kernels.methods import Plan

from helpers import ROOT

MINI = str(ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml")


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Work in an empty folder; any model build fails the test (errors must come before it)."""
    import flowbp_train.models as models

    def boom(*a, **k):
        raise AssertionError("a model was built before the error")

    monkeypatch.setattr(models, "build_adapter", boom)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line_error(capsys, prog: str, rc: int) -> str:
    """The message of a one-line ``prog[ subcommand]: error: ...`` on stderr with exit status 2."""
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and err.startswith(prog) and ": error: " in err, err
    return err.split(": error: ", 1)[1]


def nothing_written(folder: Path) -> None:
    assert not any(folder.iterdir()), sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ flowbp-train
TRAIN_BAD = [
    # model
    ("family=sdxl", "family"), ("family=", "family"), ("family=[sd3]", "family"),
    ("pretrained_model_name_or_path=", "pretrained_model_name_or_path"),
    ("pretrained_model_name_or_path=null", "pretrained_model_name_or_path"),
    ("resolution=0", "resolution"), ("resolution=-16", "resolution"), ("resolution=17", "resolution"),
    ("resolution=512", "resolution"), ("resolution=1e3", "resolution"), ("resolution=big", "resolution"),
    ("resolution=true", "resolution"), ("resolution=99999999", "resolution"),
    ("guidance_scale=0", "guidance_scale"), ("guidance_scale=-1", "guidance_scale"),
    ("guidance_scale=.inf", "guidance_scale"), ("guidance_scale=.nan", "guidance_scale"),
    ("guidance_scale=1e9", "guidance_scale"), ("guidance_scale=strong", "guidance_scale"),
    ("grad_negative=yes", "grad_negative"), ("cfg_grad_compensate=2", "cfg_grad_compensate"),
    ("max_sequence_length=0", "max_sequence_length"), ("max_sequence_length=1000000", "max_sequence_length"),
    ("offload_text_encoders=off", "offload_text_encoders"),
    # method
    ("method=nope", "method"), ("method=", "method"), ("method=[refl]", "method"),
    ("method_options={alpha: 2}", "method_options.alpha"), ("method_options={alpha: -0.1}", "method_options.alpha"),
    ("method_options={alpha: .nan}", "method_options.alpha"), ("method_options={alpha: true}", "method_options.alpha"),
    ("method_options={alpha: x}", "method_options.alpha"),
    ("method_options={dirichlet: 5}", "method_options.dirichlet"),
    ("method_options={dirichlet: [1, 2]}", "method_options.dirichlet"),
    ("method_options={dirichlet: [1, -1, 2]}", "method_options.dirichlet"),
    ("method_options={dirichlet: [a, b, c]}", "method_options.dirichlet"),
    ("method_options={dirichlet: [1, 2, .inf]}", "method_options.dirichlet"),
    ("method_options={dirichlet: [1, 2, 1e9]}", "method_options.dirichlet"),
    ("method_options={order: 0}", "method_options.order"), ("method_options={order: 100}", "method_options.order"),
    ("method_options={order: 2.5}", "method_options.order"), ("method_options={tau: 0}", "method_options.tau"),
    ("method_options={tau: -1}", "method_options.tau"), ("method_options={tail_ratio: 0}", "method_options.tail_ratio"),
    ("method_options={tail_ratio: 2}", "method_options.tail_ratio"),
    ("method_options={grad_rescale: 5}", "method_options.grad_rescale"),
    ("method_options={support_scale: -1}", "method_options.support_scale"),
    ("method_options={max_active_supports: 0}", "method_options.max_active_supports"),
    ("method_options={max_j_rev: 0}", "method_options.max_j_rev"), ("method_options={nope: 1}", "method_options.nope"),
    ("method_options=5", "method_options"), ("method_options=[1]", "method_options"),
    ("method_options.alpha=9", "method_options.alpha"), ("method_options={1: 2}", "method_options"),
    (["method=flowbp-sparse", "method_options={late_bias: 1e6}"], "method_options.late_bias"),
    (["method=flowbp-sparse", "method_options={late_bias: -1}"], "method_options.late_bias"),
    (["method=flowbp-sparse", "method_options={num_active: 0}"], "method_options.num_active"),
    (["method=flowbp-sparse", "method_options={num_active: 100000}"], "method_options.num_active"),
    (["method=flowbp-sparse", "method_options={num_active: 11}"], "method_options.num_active"),
    (["method=draft-lv", "method_options={num_noised: 1000}"], "method_options.num_noised"),
    (["method=draft-lv", "method_options={num_noised: 0}"], "method_options.num_noised"),
    (["method=refl", "method_options={last_n: 0}"], "method_options.last_n"),
    (["method=refl", "method_options={last_n: 20}"], "method_options.last_n"),
    (["method=drtune", "method_options={early_stop_ratio: 0}"], "method_options.early_stop_ratio"),
    (["method=flowbp-bridge", "method_options={num_active: 1}"], "method_options.num_active"),
    ("executor=lazy", "executor"), ("executor=", "executor"),
    ("num_steps=0", "num_steps"), ("num_steps=-1", "num_steps"), ("num_steps=10001", "num_steps"),
    ("num_steps=1180591620717411303424", "num_steps"), ("num_steps=1.5", "num_steps"), ("num_steps=ten", "num_steps"),
    ("num_steps=2", "num_steps"), ("num_steps=0x10", "num_steps"), ("num_steps=1_0", "num_steps"),
    ("velocity_cache=fp4", "velocity_cache"), ("sampler_seed=-1", "sampler_seed"),
    ("sampler_seed=1180591620717411303424", "sampler_seed"),
    # reward and loss
    ("reward=nope", "reward"), ("reward=", "reward"), ("reward_kwargs={nope: 1}", "reward_kwargs.nope"),
    ("reward_kwargs.weight_dir=/x", "reward_kwargs.weight_dir"), ("reward_kwargs=7", "reward_kwargs"),
    ("reward_kwargs={1: 2}", "reward_kwargs"), ("loss=mse", "loss"), ("loss_margin=.inf", "loss_margin"),
    ("loss_margin=.nan", "loss_margin"), ("loss_margin=high", "loss_margin"),
    # data
    ("prompts=[]", "prompts"), ("prompts=/does/not/exist.txt", "prompts"), ("prompts=5", "prompts"),
    ("prompts={a: b}", "prompts"), ("prompts=[1, 2]", "prompts"), ("prompts=*alias", "prompts"),
    ("train_batch_size=0", "train_batch_size"), ("train_batch_size=100000", "train_batch_size"),
    ("train_batch_size=2.0", "train_batch_size"), ("gradient_accumulation_steps=0", "gradient_accumulation_steps"),
    ("gradient_accumulation_steps=1000000", "gradient_accumulation_steps"),
    # optimisation
    ("rank=-1", "rank"), ("rank=1180591620717411303424", "rank"), ("rank=5000", "rank"), ("rank=1.5", "rank"),
    ("rank=two", "rank"), ("lora_alpha=.inf", "lora_alpha"), ("lora_alpha=0", "lora_alpha"),
    ("lora_alpha=-1", "lora_alpha"), ("lora_alpha=.nan", "lora_alpha"), ("lora_alpha=1e9", "lora_alpha"),
    ("lora_alpha=x", "lora_alpha"), ("lora_dropout=1", "lora_dropout"), ("lora_dropout=-0.1", "lora_dropout"),
    ("lora_dropout=.nan", "lora_dropout"), ("lora_target_modules=[]", "lora_target_modules"),
    ("lora_target_modules=['']", "lora_target_modules"), ("lora_target_modules=[1]", "lora_target_modules"),
    ("lora_target_modules=to_q", "lora_target_modules"),
    ("learning_rate=0", "learning_rate"), ("learning_rate=-1", "learning_rate"),
    ("learning_rate=.inf", "learning_rate"),
    ("learning_rate=.nan", "learning_rate"), ("learning_rate=10", "learning_rate"),
    ("learning_rate=fast", "learning_rate"), ("learning_rate=[1]", "learning_rate"),
    ("learning_rate=1e-5e", "learning_rate"), ("adam_beta1=1", "adam_beta1"), ("adam_beta1=-0.1", "adam_beta1"),
    ("adam_beta2=1.5", "adam_beta2"), ("adam_weight_decay=-1", "adam_weight_decay"),
    ("adam_weight_decay=.inf", "adam_weight_decay"), ("adam_epsilon=0", "adam_epsilon"),
    ("adam_epsilon=2", "adam_epsilon"), ("max_grad_norm=0", "max_grad_norm"), ("max_grad_norm=.inf", "max_grad_norm"),
    ("max_grad_norm=-1", "max_grad_norm"), ("lr_scheduler=warm", "lr_scheduler"),
    ("lr_warmup_steps=-1", "lr_warmup_steps"), ("max_train_steps=0", "max_train_steps"),
    ("max_train_steps=1000000000", "max_train_steps"), ("use_ema=yes", "use_ema"), ("use_ema=1", "use_ema"),
    ("use_ema=on", "use_ema"), ("ema_decay=1", "ema_decay"), ("ema_decay=0", "ema_decay"),
    ("mixed_precision=fp16", "mixed_precision"), ("mixed_precision=yes", "mixed_precision"),
    ("mixed_precision=true", "mixed_precision"), ("mixed_precision=False", "mixed_precision"),
    ("gradient_checkpointing=maybe", "gradient_checkpointing"), ("max_nonfinite_steps=0", "max_nonfinite_steps"),
    ("seed=-1", "seed"), ("seed=1180591620717411303424", "seed"), ("seed=2**70", "seed"), ("seed=1.5", "seed"),
    ("seed=0x10", "seed"), ("seed=2024-01-02", "seed"),
    ("device=cuda:99" if torch.cuda.is_available() else "device=cuda", "device"), ("device=tpu", "device"),
    ("device=cuda:x", "device"), ("device=", "device"), ("device=cpu:0", "device"),
    ("distributed_strategy=zero3", "distributed_strategy"),
    # outputs
    ("output_dir=", "output_dir"), ("checkpointing_steps=0", "checkpointing_steps"),
    ("checkpoints_total_limit=0", "checkpoints_total_limit"), ("report_to=slack", "report_to"),
    ("logging_dir=/abs", "logging_dir"), ("logging_dir=../up", "logging_dir"), ("logging_dir=", "logging_dir"),
    ("num_sample_images=-1", "num_sample_images"), ("num_sample_images=1000000", "num_sample_images"),
    ("sample_steps=0", "sample_steps"), ("sample_steps=1000000", "sample_steps"),
    ("progress_bar=maybe", "progress_bar"),
    ("resume_allow_changes=yes", "resume_allow_changes"), ("checkpoints_total_limit=-3", "checkpoints_total_limit"),
    ("resume_from_checkpoint=/does/not/exist", "resume_from_checkpoint"),
    # the keys themselves and the syntax
    ("lerning_rate=1e-4", "lerning_rate"), ("rank.x=1", "rank.x"), ("noequals", "override"), ("=5", "override"),
    ("method_options={alpha: [1}", "method_options"), ("prompts=[a, *b]", "prompts"),
]


def _ids(cases):
    return [c[0] if isinstance(c[0], str) else " ".join(c[0]) for c in cases]


@pytest.mark.parametrize("overrides, key", TRAIN_BAD, ids=_ids(TRAIN_BAD))
def test_train_bad_override(overrides, key, guarded, capsys):
    from flowbp_train.cli import train_main

    overrides = [overrides] if isinstance(overrides, str) else overrides
    out = guarded / "out"
    rc = train_main([MINI, f"output_dir={out}", *overrides])
    msg = one_line_error(capsys, "flowbp-train", rc)
    assert msg.startswith(key), msg
    nothing_written(guarded)


def test_train_output_dir_that_is_a_file(guarded, capsys):
    from flowbp_train.cli import train_main

    (guarded / "f").write_text("x")
    msg = one_line_error(capsys, "flowbp-train", train_main([MINI, f"output_dir={guarded / 'f'}"]))
    assert msg.startswith("output_dir")


# ------------------------------------------------------------------------------------------ recipes
def _recipes(tmp: Path) -> list[tuple[str, bytes, str]]:
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    laughs = "family: mini\nreward_kwargs:\n  " + laughs.replace("\n", "\n  ")
    return [
        ("binary", bytes(range(256)) * 8, "binary"),
        ("latin1", "family: mini\nprompts: [caf\xe9]\n".encode("latin-1"), "UTF-8"),
        ("nul", b"family: mini\x00\n", "binary"),
        ("laughs", laughs.encode(), "aliases"),
        ("merge", b"base: &b {rank: 4}\nmethod_options:\n  <<: *b\n", "aliases"),
        ("deep", ("x: " + "[" * 200 + "]" * 200).encode(), "nested"),
        ("list", b"- family: mini\n", "mapping"),
        ("scalar", b"just text\n", "mapping"),
        ("syntax", b"family: [mini\n", "YAML"),
        ("tabs", b"family:\tmini\n\t- x\n", "YAML"),
        ("huge", b"prompts: [" + b"a, " * 600_000 + b"b]\n", "bytes"),
        ("nonstr-key", b"1: 2\n", "keys"),
        ("dup-anchor-alias", b"a: &x 1\nb: *x\n", "aliases"),
    ]


RECIPE_CASES = [c[0] for c in _recipes(Path("."))]


@pytest.mark.parametrize("name", RECIPE_CASES)
def test_train_bad_recipe(name, guarded, capsys):
    from flowbp_train.cli import train_main

    _, data, needle = next(c for c in _recipes(guarded) if c[0] == name)
    path = guarded / f"{name}.yaml"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    rc = train_main([str(path), "pretrained_model_name_or_path=mini"])
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = one_line_error(capsys, "flowbp-train", rc)
    assert (msg.startswith("recipe") or msg.startswith("config")) and needle in msg, msg
    assert seconds < 5 and peak < 64 << 20, (seconds, peak)  # fails fast, in little memory
    assert sorted(p.name for p in guarded.iterdir()) == [path.name]


def test_missing_recipe_and_folder_recipe(guarded, capsys):
    from flowbp_train.cli import train_main

    for arg in (str(guarded / "none.yaml"), str(guarded)):
        msg = one_line_error(capsys, "flowbp-train", train_main([arg]))
        assert msg.startswith("recipe"), msg


def test_binary_prompts_file(guarded, capsys):
    from flowbp_train.cli import train_main

    f = guarded / "prompts.txt"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00" + bytes(range(200)))
    msg = one_line_error(capsys, "flowbp-train", train_main([MINI, f"prompts={f}", f"output_dir={guarded / 'o'}"]))
    assert msg.startswith("prompts") and str(f) in msg and "binary" in msg, msg


# ------------------------------------------------------------------------------------------ flowbp-eval
def _eval_cases(tmp: Path) -> list[tuple[list[str], str]]:
    prompts = tmp / "p.txt"
    prompts.write_text("digit one\n")
    binary = tmp / "b.txt"
    binary.write_bytes(bytes(range(256)))
    empty = tmp / "e.txt"
    empty.write_text("\n# only a comment\n")
    afile = tmp / "afile"
    afile.write_text("x")
    base = ["--family", "mini", "--model", "mini", "--prompts", str(prompts), "--reward", "mini",
            "--output-dir", str(tmp / "out")]

    def but(flag: str, value: str | None) -> list[str]:
        args = list(base)
        i = args.index(flag)
        return args[:i] + args[i + 2:] + ([] if value is None else [flag, value])

    return [
        (but("--family", None), "--family"), (but("--family", "sdxl"), "--family"), (but("--model", ""), "--model"),
        (but("--prompts", None), "--prompts"), (but("--prompts", str(tmp / "none.txt")), "--prompts"),
        (but("--prompts", str(binary)), "--prompts"), (but("--prompts", str(empty)), "--prompts"),
        (but("--reward", None), "--reward"), (but("--reward", ""), "--reward"), (but("--reward", ":x=1"), "--reward"),
        (but("--reward", "mini:noeq"), "--reward"), (but("--reward", "nope"), "--reward"),
        (but("--reward", "mini:foo=1"), "--reward"), (but("--output-dir", str(afile)), "--output-dir"),
        ([*base, "--num-steps", "0"], "--num-steps"), ([*base, "--num-steps", "x"], "--num-steps"),
        ([*base, "--num-steps", "100000"], "--num-steps"), ([*base, "--batch-size", "0"], "--batch-size"),
        ([*base, "--seed", "-1"], "--seed"), ([*base, "--device", "tpu"], "--device"),
        ([*base, "--device", "cuda:7"], "--device"), ([*base, "--lora", str(tmp / "none")], "--lora"),
        ([*base, "--transformer", str(tmp / "none")], "--transformer"),
        ([*base, "--compare-with", str(tmp / "none")], "--compare-with"), ([*base, "--bogus"], "unrecognized"),
        (["compare", str(tmp / "none"), "--output-dir", str(tmp / "cmp")], "runs"), (["compare"], "--output-dir"),
    ]


EVAL_COUNT = 27


@pytest.mark.parametrize("k", range(EVAL_COUNT))
def test_eval_bad_argument(k, guarded, capsys):
    from flowbp_train.evaluate import main

    cases = _eval_cases(guarded)
    assert len(cases) == EVAL_COUNT
    args, needle = cases[k]
    before = sorted(p.name for p in guarded.iterdir())
    msg = one_line_error(capsys, "flowbp-eval", main(args))
    assert needle in msg, msg
    assert sorted(p.name for p in guarded.iterdir()) == before  # nothing written


def test_eval_reads_only_its_own_images(tmp_path):
    """A scores.csv row naming another file (/etc/passwd, ../x) is dropped and redone from the image this
    tool writes for that index (sampled again when missing); an image that links outside is refused."""
    import csv

    from test_evaluate import Brightness, DummyAdapter

    from flowbp_train import evaluate as ev

    out = tmp_path / "run"
    ev.evaluate(DummyAdapter(), ["a cat", "two dogs"], [Brightness()], out, num_steps=2, progress=False)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    rows[0]["image"], rows[1]["image"] = "/etc/passwd", "../x.png"
    with (out / "scores.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    opened = []
    real_open = __import__("PIL.Image", fromlist=["open"]).open

    def spy(path, *a, **k):
        opened.append(Path(path).resolve())
        return real_open(path, *a, **k)

    (out / "images" / "00001.png").unlink()
    adapter, scorer = DummyAdapter(), Brightness()
    with pytest.MonkeyPatch.context() as mp, pytest.warns(UserWarning, match="2 rows name an image"):
        mp.setattr("PIL.Image.open", spy)
        ev.evaluate(adapter, ["a cat", "two dogs"], [scorer], out, num_steps=2, progress=False)
    assert scorer.calls == 2 and adapter.velocity_calls == 2  # both redone; the missing one sampled (2 steps)
    assert opened and all(out.resolve() in p.parents for p in opened), opened
    assert [r["image"] for r in csv.DictReader((out / "scores.csv").open())] == ["images/00000.png",
                                                                                 "images/00001.png"]
    (out / "images" / "00001.png").unlink()
    (out / "images" / "00001.png").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="leads outside the output directory"):
        ev.evaluate(DummyAdapter(), ["a cat", "two dogs", "x"], [Brightness()], out, num_steps=2, progress=False)


# ------------------------------------------------------------------------------------------ flowbp-mini
MINI_CASES = [
    (["nope"], "invalid choice"), ([], "required"), (["pretrain", "--steps", "0"], "--steps"),
    (["pretrain", "--steps", "x"], "--steps"), (["pretrain", "--threads", "0"], "--threads"),
    (["pretrain", "--threads", "5000"], "--threads"), (["pretrain", "--seed", "-1"], "--seed"),
    (["pretrain", "--out", "afile"], "--out"), (["train-reward", "--out", "afile"], "--out"),
    (["train-judge", "--out", "afile"], "--out"), (["train-reward", "--threads", "-2"], "--threads"),
    (["sample", "--guidance", "0"], "--guidance"), (["sample", "--guidance", "nan"], "--guidance"),
    (["sample", "--guidance", "inf"], "--guidance"), (["sample", "--per-prompt", "0"], "--per-prompt"),
    (["sample", "--lora", "none.safetensors"], "--lora"), (["sample", "--out", "."], "--out"),
    (["sample", "--steps", "0"], "--steps"), (["check", "--steps", "100000"], "--steps"),
    (["align"], "invalid choice"), (["report", "missing-run"], "output_dir"),
    (["study", "--seeds", "0"], "--seeds"), (["study", "--methods", "nope"], "--method"),
    (["study", "--steps", "0"], "--steps"), (["pretrain", "--bogus"], "unrecognized"),
]


@pytest.mark.parametrize("args, needle", MINI_CASES, ids=[" ".join(a) or "none" for a, _ in MINI_CASES])
def test_mini_bad_argument(args, needle, guarded, capsys):
    from flowbp_train.mini.cli import main

    (guarded / "afile").write_text("x")
    msg = one_line_error(capsys, "flowbp-mini", main(args))
    assert needle in msg, msg
    assert sorted(p.name for p in guarded.iterdir()) == ["afile"]  # nothing written


def test_mini_weights_default_outside_the_package(tmp_path, monkeypatch):
    from flowbp_train.digits import WEIGHTS_DIR
    from flowbp_train.mini.cli import build_parser, main
    from flowbp_train.weights import HASHES_FILE, sha256_of

    package = {p.name: sha256_of(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()}
    for cmd in ("pretrain", "train-reward", "train-judge"):
        assert build_parser().parse_args([cmd]).out == "flowbp-mini-weights"
    monkeypatch.chdir(tmp_path)
    assert main(["train-judge"]) == 0
    assert (tmp_path / "flowbp-mini-weights" / "judge_svc.safetensors").is_file()
    assert (tmp_path / "flowbp-mini-weights" / HASHES_FILE).is_file()
    assert {p.name: sha256_of(p) for p in WEIGHTS_DIR.iterdir() if p.is_file()} == package


# ------------------------------------------------------------------------------------------ public API
class Counting(torch.nn.Module):
    """A velocity model that counts its calls."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6).double()
        self.calls = 0

    def forward(self, x, i):
        self.calls += 1
        return self.lin(x.reshape(x.shape[0], -1)).reshape(x.shape)


@pytest.fixture
def engine():
    n = 8
    sig = fb.flow_sigmas(n)
    net = Counting()
    ro = fb.rollout(net, torch.randn(2, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), sig)
    net.calls = 0
    return net, ro, sig, n


def reward(x):
    return x.flatten(1).sum(1)


def _plan(name, n, **kw):
    m = fb.get_method(name)
    base = m.plan(n, torch.Generator().manual_seed(0))
    fields = {**base.as_dict(), **kw}
    return m, Plan(**fields)


PLAN_BAD = [
    ("flowbp-sparse", {"active": (-1, 3)}, "plan"), ("flowbp-sparse", {"active": ()}, "plan"),
    ("flowbp-sparse", {"active": (3, 100)}, "plan"), ("flowbp-sparse", {"active": (3.7,)}, "plan"),
    ("flowbp-sparse", {"active": (3, 3)}, "plan"), ("flowbp-sparse", {"active": [3, 4]}, "plan.active"),
    ("flowbp-sparse", {"num_steps": 5}, "plan.num_steps"), ("flowbp-sparse", {"num_steps": -1}, "plan.num_steps"),
    ("flowbp-sparse", {"window_start": 3}, "plan.window_start"), ("flowbp-sparse", {"method": "refl"}, "plan.method"),
    ("flowbp-lagrange", {"k": 6, "j": 2}, "plan"), ("flowbp-lagrange", {"k": 1.5}, "plan.k"),
    ("flowbp-lagrange", {"k": True}, "plan.k"), ("flowbp-lagrange", {"j": 99}, "plan"),
    ("flowbp-lagrange", {"active": (0, 1)}, "plan.active"), ("flowbp-lagrange", {"k": None}, "plan"),
    ("draft-lv", {"noise_seed": 2**63}, "plan.noise_seed"), ("draft-lv", {"noise_seed": -3}, "plan.noise_seed"),
    ("draft-lv", {"active": (0,)}, "plan.active"), ("refl", {"tau": None}, "plan"), ("refl", {"tau": 8}, "plan"),
    ("drtune", {"stop": 2}, "plan"), ("flowbp-bridge", {"j": 0}, "plan"), ("full", {"active": (7,)}, "plan.active"),
    ("leapalign", {"k": 3, "j": 3}, "plan"),
]


@pytest.mark.parametrize("name, fields, needle", PLAN_BAD, ids=[f"{n}-{f}" for n, f, _ in PLAN_BAD])
def test_hand_built_plan_is_validated(engine, name, fields, needle):
    net, ro, _, n = engine
    method, plan = _plan(name, n, **fields)
    with pytest.raises((ValueError, TypeError)) as err:
        fb.reward_backprop(method, net, ro, reward, plan=plan)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(needle), msg
    assert net.calls == 0 and all(p.grad is None for p in net.parameters())


METHOD_BAD = [
    ("flowbp", {}, "unknown method"), (5, {}, "unknown method"), ("refl", {"alpha": 1}, "unknown option"),
    ("flowbp-lagrange", {"dirichlet": 5}, "dirichlet"), ("flowbp-lagrange", {"dirichlet": "abc"}, "dirichlet"),
    ("flowbp-lagrange", {"order": 3.0}, "order"), ("flowbp-lagrange", {"alpha": float("nan")}, "alpha"),
    ("flowbp-lagrange", {"tau": 0.0}, "tau"), ("flowbp-sparse", {"late_bias": 1e6}, "late_bias"),
    ("flowbp-sparse", {"grad_rescale": -1}, "grad_rescale"), ("draft-lv", {"num_noised": 17}, "num_noised"),
    ("refl", {"last_n": True}, "last_n"), ("flowbp-sparse", {"num_active": "3"}, "num_active"),
    ("flowbp-lagrange", {"max_j_rev": 0}, "max_j_rev"), ("flowbp-sparse", {"tail_ratio": 1.5}, "tail_ratio"),
]


@pytest.mark.parametrize("name, opts, needle", METHOD_BAD, ids=[f"{n}-{o}" for n, o, _ in METHOD_BAD])
def test_get_method_bad_options(name, opts, needle):
    with pytest.raises(ValueError) as err:
        fb.get_method(name, **opts)
    assert "\n" not in str(err.value) and needle in str(err.value)


PLAN_ARG_BAD = [
    ("flowbp-sparse", 10, {"active": [3.7]}, "active"), ("flowbp-sparse", 10, {"active": []}, "active"),
    ("flowbp-sparse", 10, {"active": [-1]}, "active"), ("flowbp-sparse", 10, {"active": [100]}, "active"),
    ("flowbp-sparse", 10, {"active": "3"}, "active"), ("flowbp-sparse", 10, {"active": 3}, "active"),
    ("flowbp-lagrange", 10, {"k": 1.5, "j": 5}, "k"), ("flowbp-lagrange", 10, {"k": True, "j": 5}, "k"),
    ("flowbp-lagrange", 10, {"k": 2, "j": 10}, "j"), ("flowbp-sparse", 0, {}, "num_steps"),
    ("flowbp-sparse", 1.5, {}, "num_steps"), ("flowbp-sparse", 10, {"k": 1}, "unknown plan argument"),
]


@pytest.mark.parametrize("name, n, kw, needle", PLAN_ARG_BAD, ids=[f"{a}-{b}-{c}" for a, b, c, _ in PLAN_ARG_BAD])
def test_method_plan_bad_arguments(name, n, kw, needle):
    with pytest.raises(ValueError) as err:
        fb.get_method(name).plan(n, torch.Generator().manual_seed(0), **kw)
    assert "\n" not in str(err.value) and needle in str(err.value)


def _rollout_cases():
    sig = fb.flow_sigmas(4)
    x = torch.randn(2, 3)
    nan = x.clone()
    nan[0, 1] = float("nan")
    inf = x.clone()
    inf[1, 2] = float("inf")
    return [
        ({"x_init": x.tolist(), "sigmas": sig}, TypeError, "x_init"),
        ({"x_init": torch.ones(2, 3, dtype=torch.long), "sigmas": sig}, TypeError, "x_init"),
        ({"x_init": torch.randn(3), "sigmas": sig}, ValueError, "x_init"),
        ({"x_init": torch.randn(0, 3), "sigmas": sig}, ValueError, "x_init"),
        ({"x_init": nan, "sigmas": sig}, ValueError, "x_init"), ({"x_init": inf, "sigmas": sig}, ValueError, "x_init"),
        ({"x_init": x, "sigmas": sig.tolist()}, TypeError, "sigmas"),
        ({"x_init": x, "sigmas": sig * float("nan")}, ValueError, "sigmas"),
        ({"x_init": x, "sigmas": sig.flip(0)}, ValueError, "sigmas"),
        ({"x_init": x, "sigmas": sig[:1]}, ValueError, "sigmas"),
        ({"x_init": x, "sigmas": sig, "latent_dtype": torch.int8}, TypeError, "latent_dtype"),
        ({"x_init": x, "sigmas": sig, "cache": "fp4"}, ValueError, "fp4"),
    ]


@pytest.mark.parametrize("k", range(12))
def test_rollout_bad_arguments(k):
    kw, exc, needle = _rollout_cases()[k]
    calls = []
    with pytest.raises(exc) as err:
        fb.rollout(lambda x, i: calls.append(i) or x, **kw)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
    assert calls == []  # before the first model call


def test_rollout_velocity_fn_not_callable():
    with pytest.raises(TypeError, match="velocity_fn"):
        fb.rollout(None, torch.randn(2, 3), fb.flow_sigmas(3))


BACKPROP_BAD = [
    ({"method": "flowbp-sparse"}, TypeError, "method"), ({"rollout": [1]}, TypeError, "rollout"),
    ({"loss": "mse"}, ValueError, "loss"), ({"loss": ("hinge", float("inf"))}, ValueError, "hinge"),
    ({"loss_scale": "1"}, TypeError, "loss_scale"), ({"loss_scale": float("nan")}, ValueError, "loss_scale"),
    ({"params": torch.zeros(3)}, TypeError, "params"), ({"params": [1, 2]}, TypeError, "params"),
    ({"executor": "fast"}, ValueError, "executor"), ({"velocity_fn": None}, TypeError, "velocity_fn"),
    ({"reward_fn": None}, TypeError, "reward_fn"), ({"plan": "auto"}, TypeError, "plan"),
    ({"generator": 5}, TypeError, "generator"),
]


@pytest.mark.parametrize("kw, exc, needle", BACKPROP_BAD, ids=[str(list(k)) for k, _, _ in BACKPROP_BAD])
def test_reward_backprop_bad_arguments(engine, kw, exc, needle):
    net, ro, _, _ = engine
    args = {"method": fb.get_method("flowbp-sparse"), "velocity_fn": net, "rollout": ro, "reward_fn": reward, **kw}
    with pytest.raises(exc) as err:
        fb.reward_backprop(args.pop("method"), args.pop("velocity_fn"), args.pop("rollout"), args.pop("reward_fn"),
                           **args)
    assert "\n" not in str(err.value) and needle in str(err.value), str(err.value)
    assert net.calls == 0 and all(p.grad is None for p in net.parameters())


SIGMAS_BAD = [((0,), {}, "num_steps"), ((1.5,), {}, "num_steps"), ((10**9,), {}, "num_steps"),
              ((4,), {"shift": "3"}, "shift"), ((4,), {"shift": -1.0}, "shift"), ((4,), {"mu": math.inf}, "mu"),
              ((4,), {"mu": 1e3}, "mu"), ((4,), {"shift": 3.0, "mu": 1.0}, "shift or mu")]


@pytest.mark.parametrize("args, kw, needle", SIGMAS_BAD, ids=[f"{a}-{k}" for a, k, _ in SIGMAS_BAD])
def test_flow_sigmas_bad_arguments(args, kw, needle):
    with pytest.raises((ValueError, TypeError)) as err:
        fb.flow_sigmas(*args, **kw)
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_lora_targets_that_match_nothing_fail_before_the_reward_loads(tmp_path, monkeypatch):
    import flowbp_train.rewards as rewards
    from flowbp_train.config import ConfigError, from_dict
    from flowbp_train.trainer import Trainer

    from helpers.pipelines import tiny_adapter

    monkeypatch.setattr(rewards, "get_reward", lambda *a, **k: pytest.fail("the reward was built first"))
    cfg = from_dict(dict(family="sd3", pretrained_model_name_or_path="tiny", num_steps=6, resolution=16,
                         mixed_precision="no", device="cpu", rank=4, lora_target_modules=["to_q", "attn.to_qq"],
                         output_dir=str(tmp_path / "out"), report_to="none", num_sample_images=0))
    adapter = tiny_adapter("sd3")
    with pytest.raises(ConfigError, match=r"^lora_target_modules: 'attn.to_qq' matches no module"):
        Trainer(cfg, adapter=adapter)
    assert not any("lora" in n for n, _ in adapter.transformer.named_parameters())  # nothing injected


# ------------------------------------------------------------------------------------------ subprocesses
SUBPROCESS = [
    (["-m", "flowbp_train.cli", MINI, "learning_rate=.inf"], "flowbp-train", "learning_rate"),
    (["-m", "flowbp_train.cli", MINI, "seed=1180591620717411303424"], "flowbp-train", "seed"),
    (["-c", "from flowbp_train.cli import eval_main; raise SystemExit(eval_main())", "--family", "mini",
      "--model", "mini", "--prompts", "/nonexistent", "--reward", "mini", "--output-dir", "o"], "flowbp-eval",
     "--prompts"),
    (["-c", "from flowbp_train.cli import mini_main; raise SystemExit(mini_main())", "sample", "--guidance", "-1"],
     "flowbp-mini", "--guidance"),
]


@pytest.mark.parametrize("args, prog, needle", SUBPROCESS, ids=[f"{p}-{n}" for _, p, n in SUBPROCESS])
def test_real_commands_as_subprocesses(args, prog, needle, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "\n" not in err and err.startswith(f"{prog}: error: ") and needle in err, err
    assert not any(tmp_path.iterdir())


def test_billion_laughs_recipe_as_a_subprocess(tmp_path):
    _, data, _ = next(c for c in _recipes(tmp_path) if c[0] == "laughs")
    (tmp_path / "r.yaml").write_bytes(data)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flowbp_train.cli", "r.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "aliases" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert time.perf_counter() - t0 < 60


def test_at_least_200_bad_inputs():
    total = (len(TRAIN_BAD) + 1 + len(RECIPE_CASES) + 3 + EVAL_COUNT + 1 + len(MINI_CASES) + len(PLAN_BAD)
             + len(METHOD_BAD) + len(PLAN_ARG_BAD) + 13 + len(BACKPROP_BAD) + len(SIGMAS_BAD) + 1 + len(SUBPROCESS) + 1)
    print(f"\nbad inputs tried: {total}")
    assert total >= 200
