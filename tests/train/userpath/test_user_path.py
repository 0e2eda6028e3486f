"""The path a user with real weights takes, on tiny complete folders, through the real command lines.

For every family: the README's ``flowbp-train`` command (plus sizing overrides) trains a LoRA for two
steps (rank 4, lora_alpha 16) and in full (``rank=0``); a copy of the first checkpoint resumes to the same
LoRA; the final LoRA loads with the stock pipeline's ``load_lora_weights``, changes its image and
reproduces the trained velocity (against the merged weights ``W + (alpha / r) B A`` built here from the file
and the run's config); the README's ``flowbp-eval`` commands score the checkpoint's EMA LoRA and the fully
fine-tuned transformer, and the LoRA images are those of the merged model. The commands are read from
README.md, so the README shows exactly what this suite runs. Subprocesses run two at a time; each costs
about 7 s of CPU, 6 of them importing torch, diffusers and transformers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT
from helpers import folders as tf

README = ROOT / "README.md"
FAMILIES = ("flux1", "sd3", "flux2")
PIPELINE_CLASSES = {"flux1": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "flux2": "Flux2KleinPipeline"}
ADAPTERS = {"flux1": "flowbp_train.models.flux:FluxAdapter", "sd3": "flowbp_train.models.sd3:SD3Adapter",
            "flux2": "flowbp_train.models.flux2:Flux2Adapter"}
# the families added later, one self-contained entry each
FAMILIES += ("z-image",)
PIPELINE_CLASSES["z-image"] = "ZImagePipeline"
ADAPTERS["z-image"] = "flowbp_train.models.zimage:ZImageAdapter"
#: per family: the tokenizers the folder loads with, the prompt length the adapter encodes to, the number
#: of text encoders, the transformer class of a full fine-tuning export
ADDED = {"z-image": ({"tokenizer": "Qwen2Tokenizer"}, 512, 1, "ZImageTransformer2DModel")}
# FLUX.2-dev: Mistral3 text encoder; the folder's tokenizer is the fast tokenizer inside the published
# PixtralProcessor (tests/helpers/folders.py says why; test_pixtral_processor_encodes_as_the_folder checks it)
FAMILIES += ("flux2-dev",)
PIPELINE_CLASSES["flux2-dev"] = "Flux2Pipeline"
ADAPTERS["flux2-dev"] = "flowbp_train.models.flux2_dev:Flux2DevAdapter"
ADDED["flux2-dev"] = ({"tokenizer": "PreTrainedTokenizerFast"}, 512, 1, "Flux2Transformer2DModel")
RANK, ALPHA = 4, 16  # lora_alpha != rank: the export must keep the scale alpha / r = 4
EVAL_STEPS, SEED = 2, 0
#: what makes a README command fit a CPU test: tiny sizes, fp32, the offline reward and prompts (added below)
SIZE = ["resolution=16", "num_steps=6", "train_batch_size=2", "max_train_steps=2", "device=cpu",
        "mixed_precision='no'", "report_to=none", "progress_bar=false", "num_sample_images=1", "sample_steps=2",
        "checkpointing_steps=1", "loss=neg", "learning_rate=1.0e-2", "ema_decay=0.5"]
EVAL_SIZE = ["--num-steps", str(EVAL_STEPS), "--resolution", "16", "--dtype", "fp32", "--device", "cpu",
             "--batch-size", "2", "--seed", str(SEED), "--no-progress"]
TIMEOUT = 600


# ------------------------------------------------------------------------------------------ README
def readme_commands() -> list[list[str]]:
    """Every ``flowbp-train recipes/...`` and ``flowbp-eval`` command of the README's bash blocks."""
    text = README.read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["flowbp-eval"] or (argv[:1] == ["flowbp-train"] and argv[1].startswith("recipes/")):
                cmds.append(argv)
    return cmds


def family_of(argv: list[str]) -> str | None:
    if argv[0] == "flowbp-train":
        return argv[1].split("/")[1]
    return argv[argv.index("--family") + 1] if "--family" in argv else None


def _exe(name: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    if script.is_file():  # the installed console script: what the user runs
        return [str(script)]
    entry = {"flowbp-train": "train_main", "flowbp-eval": "eval_main"}[name]
    return [sys.executable, "-c", f"import sys; from flowbp_train.cli import {entry}; sys.exit({entry}())"]


def run_cli(argv: list[str], log: list) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "FLOWBP_JIT": "0",
           "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([*_exe(argv[0]), *argv[1:]], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
    log.append((" ".join(argv[:2]), round(time.perf_counter() - t0, 1)))
    return proc


def _train_argv(readme: list[str], folders, out: Path, *extra: str) -> list[str]:
    argv = [readme[0], str(ROOT / readme[1])]
    flags = [a for a in readme[2:] if a.startswith("--")]
    for item in (a for a in readme[2:] if not a.startswith("--")):
        key = item.split("=", 1)[0]  # the model folder replaces the README's; the offline reward replaces its own
        if key == "reward" or key.startswith("reward_kwargs"):
            continue
        argv.append(f"{key}={folders[family_of(readme)]}" if key == "pretrained_model_name_or_path" else item)
    reward = ["reward=pickscore", f"reward_kwargs.model_path={folders['clip']}",
              f"reward_kwargs.processor_path={folders['clip']}", f"prompts={folders['prompts']}"]
    return [*argv, *reward, *SIZE, f"output_dir={out}", *extra, *flags]


def _eval_argv(readme: list[str], folders, out: Path, *, lora: Path | None = None,
               transformer: Path | None = None) -> list[str]:
    """The README's eval command with the tiny folders in place of its paths."""
    values = {"--model": str(folders[family_of(readme)]), "--prompts": str(folders["prompts"]),
              "--output-dir": str(out)}
    argv, it = [readme[0]], iter(readme[1:])
    for flag in it:
        value = None if flag in ("--no-progress",) else next(it)
        if flag in ("--lora", "--transformer"):
            continue  # the weights to load are chosen below
        if flag == "--reward":
            name, _, opts = value.partition(":")
            assert name in ("pickscore", "clipscore"), f"README eval reward {name!r} has no offline test weights"
            opts = ",".join(f"{k}={folders['clip']}" for k, _ in (o.split("=", 1) for o in opts.split(",") if o))
            value = f"{name}:{opts}" if opts else name
        argv += [flag] if value is None else [flag, values.get(flag, value)]
    if lora is not None:
        argv += ["--lora", str(lora)]
    if transformer is not None:
        argv += ["--transformer", str(transformer)]
    return [*argv, *EVAL_SIZE]


def _family_commands(family: str):
    cmds = readme_commands()
    train = [c for c in cmds if c[0] == "flowbp-train" and family_of(c) == family and "--dry-run" not in c]
    dry = [c for c in cmds if c[0] == "flowbp-train" and family_of(c) == family and "--dry-run" in c]
    evals = [c for c in cmds if c[0] == "flowbp-eval" and family_of(c) == family]
    assert train and evals, f"README has no flowbp-train / flowbp-eval command for {family}"
    return train[0], dry, next((c for c in evals if "--lora" in c), evals[0]), \
        next((c for c in evals if "--transformer" in c), None)


def _lora_chain(family: str, folders, root: Path, r: dict) -> None:
    """LoRA training, resume from a copy of checkpoint 1, flowbp-eval --lora (and the README's dry run)."""
    train, dry, lora_cmd, _ = _family_commands(family)
    for c in dry:
        r["dry_run"] = run_cli(_train_argv(c, folders, root / "dry"), r["log"])
    r["train_lora"] = run_cli(_train_argv(train, folders, r["lora"], f"rank={RANK}", f"lora_alpha={ALPHA}"),
                              r["log"])
    if r["train_lora"].returncode != 0:
        return
    shutil.copytree(r["lora"] / "checkpoint-1", r["resumed"] / "checkpoint-1")
    r["resume"] = run_cli(_train_argv(train, folders, r["resumed"], f"rank={RANK}", f"lora_alpha={ALPHA}",
                                      "resume_from_checkpoint=latest"), r["log"])
    r["eval_lora"] = run_cli(_eval_argv(lora_cmd, folders, r["eval_lora_dir"], lora=r["lora"] / "checkpoint-2"),
                             r["log"])
    r["eval_dirs"][_value(lora_cmd, "--output-dir")] = r["eval_lora_dir"]


def _full_chain(family: str, folders, root: Path, r: dict) -> None:
    """Full fine-tuning (rank=0) and, where the README has one for the family, flowbp-eval --transformer."""
    train, _, _, tr_cmd = _family_commands(family)
    r["train_full"] = run_cli(_train_argv(train, folders, r["full"], "rank=0", "learning_rate=1.0e-5"), r["log"])
    if tr_cmd is not None and r["train_full"].returncode == 0:  # one family: each process costs ~7 s of CPU
        r["eval_full"] = run_cli(_eval_argv(tr_cmd, folders, r["eval_full_dir"],
                                            transformer=r["full"] / "transformer"), r["log"])
        r["eval_dirs"][_value(tr_cmd, "--output-dir")] = r["eval_full_dir"]


def _value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _compare(runs: dict, root: Path) -> tuple[list, subprocess.CompletedProcess | None]:
    """The README's ``flowbp-eval compare`` command on the suite's evaluation folders."""
    dirs = {k: v for f in FAMILIES for k, v in runs[f]["eval_dirs"].items()}
    cmds = [c for c in readme_commands() if c[:2] == ["flowbp-eval", "compare"]]
    if not cmds:
        return [], None
    c = cmds[0]
    runs_given = c[2:c.index("--output-dir")]
    assert all(d in dirs for d in runs_given), f"compare names runs no README eval command writes: {runs_given}"
    argv = ["flowbp-eval", "compare", *(str(dirs[d]) for d in runs_given), "--output-dir", str(root)]
    return c, run_cli(argv, [])


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    workers = max(1, min(len(FAMILIES), os.cpu_count() or 1, 2))  # two CLI processes at a time
    t0 = time.perf_counter()
    out: dict = {}
    for f in FAMILIES:
        d = root / f
        out[f] = {"log": [], "lora": d / "lora", "resumed": d / "resumed", "full": d / "full", "eval_dirs": {},
                  "eval_lora_dir": d / "eval-lora", "eval_full_dir": d / "eval-full",
                  "readme_run": [c for c in readme_commands() if family_of(c) == f]}
    with ThreadPoolExecutor(workers) as pool:  # six independent chains of one to four commands
        jobs = [pool.submit(chain, f, folders, root / f, out[f]) for chain in (_lora_chain, _full_chain)
                for f in FAMILIES]
        for job in jobs:
            job.result()
    out["compare_cmd"], out["compare"] = _compare(out, root / "compare")
    out["compare_dir"] = root / "compare"
    out["seconds"] = time.perf_counter() - t0
    return out


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# ------------------------------------------------------------------------------------------ helpers
def _tokenizer_class_name(name: str) -> str:
    """The class a tokenizer named ``name`` is in the installed transformers (5.x renamed the generic fast
    tokenizer ``PreTrainedTokenizerFast`` to ``TokenizersBackend`` and kept the old name as an alias)."""
    import transformers

    return getattr(transformers, name).__name__


def _cls(path: str):
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _pipeline(family: str, folder):
    import diffusers

    from flowbp_train.models.base import dtype_kwargs

    return getattr(diffusers, PIPELINE_CLASSES[family]).from_pretrained(str(folder), **dtype_kwargs(torch.float32))


def _merged_transformer_state(pipe, lora_file: Path, rank: int, alpha: float) -> dict:
    """``W + (alpha / r) B A`` for every LoRA'd linear: the trained model, built without any LoRA loader."""
    from safetensors.torch import load_file

    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    lora = {k.removeprefix("transformer."): v.double() for k, v in load_file(str(lora_file)).items()}
    for key in [k for k in lora if k.endswith(".lora_A.weight")]:
        module = key.removesuffix(".lora_A.weight")
        delta = (alpha / rank) * lora[f"{module}.lora_B.weight"] @ lora[key]
        state[f"{module}.weight"] = (state[f"{module}.weight"].double() + delta).float()
    return state


def _run_config(out: Path) -> dict:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def _adapter(family, pipe):
    return _cls(ADAPTERS[family])(pipe, resolution=tf.RESOLUTION, device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_loads_in_the_stock_pipeline_with_real_tokenizers(folders, family):
    pipe = _pipeline(family, folders[family])
    names = {n: type(getattr(pipe, n)).__name__ for n in ("tokenizer", "tokenizer_2", "tokenizer_3")
             if getattr(pipe, n, None) is not None}
    want = {"flux1": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5Tokenizer"},
            "sd3": {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer", "tokenizer_3": "T5Tokenizer"},
            "flux2": {"tokenizer": "Qwen2Tokenizer"}, **{f: a[0] for f, a in ADDED.items()}}[family]
    assert names == {n: _tokenizer_class_name(c) for n, c in want.items()}
    for n in names:  # every piece of a prompt is in the trained vocabulary
        tok = getattr(pipe, n)
        pieces = tok.tokenize(tf.PROMPTS[0])
        assert pieces and tok.unk_token not in pieces, (n, pieces)
    image = pipe(prompt=tf.PROMPTS[0], num_inference_steps=2, height=tf.RESOLUTION, width=tf.RESOLUTION,
                 output_type="np", generator=torch.Generator().manual_seed(0), max_sequence_length=32).images
    assert image.shape == (1, tf.RESOLUTION, tf.RESOLUTION, 3) and np.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_text_encoders_encode_in_the_model_dtype_at_the_family_length(folders, family):
    """Prompts are encoded by the text encoders placed on the adapter's device in its dtype (bf16 here),
    at the reference max_sequence_length (512 T5 / Qwen3 tokens; SD3: 77 CLIP + 512 T5), then offloaded."""
    pipe = _pipeline(family, folders[family])
    ad = _cls(ADAPTERS[family])(pipe, resolution=tf.RESOLUTION, device="cpu", dtype=torch.bfloat16)
    assert ad.max_sequence_length == 512
    batch = ad.encode_prompts(tf.PROMPTS[:2])
    length = {"flux1": 512, "sd3": tf.CLIP_MAX_TOKENS + 512, "flux2": 512,
              **{f: a[1] for f, a in ADDED.items()}}[family]
    assert batch.tensors["encoder_hidden_states"].shape[:2] == (2, length)
    encoders = ad.text_encoders()
    assert len(encoders) == {"flux1": 2, "sd3": 3, "flux2": 1, **{f: a[2] for f, a in ADDED.items()}}[family]
    assert all(p.dtype == torch.bfloat16 for e in encoders for p in e.parameters())
    negative = ad.uses_cfg if family in ADDED else family != "flux1"
    assert ad.encoded_prompts == 2 + negative
    assert ad.encode_seconds > 0  # + the empty negative where CFG runs
    ad.offload_text_encoders()
    assert all(p.device.type == "cpu" for e in encoders for p in e.parameters())


def test_readme_commands_are_the_ones_the_suite_runs(runs):
    cmds = readme_commands()
    ran = [c for f in FAMILIES for c in runs[f]["readme_run"]] + [runs["compare_cmd"]]
    for fam in FAMILIES:
        assert [c for c in cmds if c[0] == "flowbp-train" and family_of(c) == fam], fam
        assert [c for c in cmds if c[0] == "flowbp-eval" and family_of(c) == fam and "--lora" in c], fam
    # every flowbp-train / flowbp-eval command of the README runs here, but the miniature's (tests/train/mini)
    assert all(c in ran for c in cmds if family_of(c) != "mini")
    assert any("--transformer" in c for c in cmds) and any("eval_full" in runs[f] for f in FAMILIES)
    _ok(runs["compare"])
    table = (runs["compare_dir"] / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(runs["compare_cmd"][2:-2])  # header, rule, one row per run
    print(f"user-path CLI runs: {runs['seconds']:.0f} s wall;",
          {f: runs[f]["log"] for f in FAMILIES})


@pytest.mark.parametrize("family", FAMILIES)
def test_train_lora_checkpoints_and_resume(runs, family):
    from safetensors.torch import load_file

    from flowbp_train.weights import EMA_LORA_FILE, LORA_FILE, read_lora_metadata

    r = runs[family]
    for key in ("train_lora", "resume", *(("dry_run",) if "dry_run" in r else ())):
        _ok(r[key])
    out = r["lora"]
    log = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(np.isfinite(x["loss"]) for x in log)
    assert log[-1]["grad_norm"] > 0
    for step in (1, 2):
        ck = out / f"checkpoint-{step}"
        assert [read_lora_metadata(ck / f)[1]["weights"] for f in (LORA_FILE, EMA_LORA_FILE)] == ["raw", "ema"]
    config, info = read_lora_metadata(out / LORA_FILE)
    assert (config["r"], config["lora_alpha"], info["weights"], info["step"]) == (RANK, ALPHA, "ema", 2)
    assert (out / "samples" / "sample_00.png").is_file() and (out / "README.md").is_file()
    resumed = r["resumed"]
    rlog = [json.loads(x) for x in (resumed / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rlog] == [2]
    # the resumed step redoes the uninterrupted one: same inputs, same loss and gradient norm to float32
    # rounding (a fresh process may take other vectorised paths, so not asserted bit for bit)
    assert rlog[0]["loss"] == pytest.approx(log[1]["loss"], rel=1e-6, abs=1e-9)
    assert rlog[0]["grad_norm"] == pytest.approx(log[1]["grad_norm"], rel=1e-5)
    a, b = load_file(str(out / LORA_FILE)), load_file(str(resumed / LORA_FILE))
    assert a.keys() == b.keys()
    # AdamW divides by sqrt(v) + 1e-8: gradient entries near 1e-8 turn rounding-level differences of the
    # backward into visible update differences of single entries, so the LoRA is compared as a whole
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a) ** 0.5
    assert diff <= 1e-4 * sum(float(a[k].double().square().sum()) for k in a) ** 0.5


@pytest.mark.parametrize("family", FAMILIES)
def test_full_finetuning_writes_a_loadable_transformer(runs, family):
    import diffusers

    r = runs[family]
    _ok(r["train_full"])
    cls = getattr(diffusers, {"flux1": "FluxTransformer2DModel", "sd3": "SD3Transformer2DModel",
                              "flux2": "Flux2Transformer2DModel", **{f: a[3] for f, a in ADDED.items()}}[family])
    tr = cls.from_pretrained(str(r["full"] / "transformer"))
    assert sum(p.numel() for p in tr.parameters()) > 0
    log = [json.loads(x) for x in (r["full"] / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2] and all(np.isfinite(x["loss"]) for x in log)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_final_lora_in_the_stock_pipeline(runs, folders, family):
    """``pipe.load_lora_weights(output_dir)`` changes the pipeline's image and reproduces the velocity of
    the trained model (the EMA weights at their scale alpha / r, merged here by hand)."""
    r = runs[family]
    _ok(r["train_lora"])
    out = r["lora"]
    cfg = _run_config(out)
    assert (cfg["rank"], cfg["lora_alpha"]) == (RANK, ALPHA)
    base, lora_pipe, ref_pipe = (_pipeline(family, folders[family]) for _ in range(3))
    lora_pipe.load_lora_weights(str(out))
    ref_pipe.transformer.load_state_dict(_merged_transformer_state(ref_pipe, out / "pytorch_lora_weights.safetensors",
                                                                   cfg["rank"], cfg["lora_alpha"]))

    def image(pipe):
        return pipe(prompt=tf.PROMPTS[0], num_inference_steps=2, height=tf.RESOLUTION, width=tf.RESOLUTION,
                    output_type="np", generator=torch.Generator().manual_seed(0)).images

    assert np.abs(image(lora_pipe) - image(base)).max() > 1e-3
    ads = [_adapter(family, p) for p in (lora_pipe, ref_pipe, base)]
    batch = ads[0].encode_prompts(tf.PROMPTS[:2])
    sig = ads[0].sigmas(4)
    x = ads[0].initial_noise(2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v_lora, v_ref, v_base = (ad.velocity_fn(batch, sig)(x, 1) for ad in ads)
    effect = float((v_ref - v_base).abs().max())
    assert effect > 1e-4  # the LoRA does something, so a wrong scale would show
    # fp32, the same layers; peft computes W x + s B (A x), the reference (W + s B A) x: rounding only
    assert torch.allclose(v_lora, v_ref, atol=1e-5, rtol=1e-4), (float((v_lora - v_ref).abs().max()), effect)


@pytest.mark.parametrize("family", FAMILIES)
def test_flowbp_eval_scores_the_ema_lora_and_the_transformer(runs, folders, family):
    """flowbp-eval on checkpoint-2 scores its EMA LoRA (the summary says so) and its images are the merged
    EMA model's; the README's --transformer example scores the fully fine-tuned transformer."""
    from PIL import Image

    from flowbp_kernels import rollout

    r = runs[family]
    _ok(r["eval_lora"])
    done = [(r["eval_lora_dir"], "lora")]
    if "eval_full" in r:
        _ok(r["eval_full"])
        done.append((r["eval_full_dir"], "transformer"))
    for d, kind in done:
        summary = json.loads((d / "summary.json").read_text())
        assert summary["weights"]["kind"] == kind and summary["num_prompts"] == len(tf.PROMPTS)
        assert summary["num_steps"] == EVAL_STEPS and summary["sampling"]["resolution"] == tf.RESOLUTION
        assert (d / "grid.png").is_file() and len((d / "scores.csv").read_text().splitlines()) == 1 + len(tf.PROMPTS)
        assert all((d / "images" / f"{i:05d}.png").is_file() for i in range(len(tf.PROMPTS)))
    lora = json.loads((r["eval_lora_dir"] / "summary.json").read_text())["weights"]
    assert (lora["lora_weights"], lora["step"], lora["lora_alpha"]) == ("ema", 2, ALPHA)
    assert lora["path"].endswith("checkpoint-2/pytorch_lora_weights_ema.safetensors")
    # flowbp-eval's first image is the merged EMA model's, sampled here the same way
    pipe = _pipeline(family, folders[family])
    pipe.transformer.load_state_dict(_merged_transformer_state(pipe, Path(lora["path"]), RANK, ALPHA))
    ad = _adapter(family, pipe)
    sig = ad.sigmas(EVAL_STEPS)
    with torch.no_grad():
        ro = rollout(ad.velocity_fn(ad.encode_prompts([tf.PROMPTS[0]]), sig),
                     ad.initial_noise(1, torch.Generator().manual_seed(SEED)), sig)
        ours = (ad.decode(ro.sample)[0].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    saved = np.asarray(Image.open(r["eval_lora_dir"] / "images" / "00000.png").convert("RGB"), dtype=np.float64)
    assert np.abs(ours - saved).max() <= 1  # 8-bit quantisation of two fp32 computations


def test_default_reward_without_weights_stops_before_the_model_loads(folders, tmp_path):
    """The README's command as is (HPSv2.1 without weights): one line naming reward_kwargs.checkpoint_path,
    exit status 2, and no pipeline component is loaded."""
    readme = next(c for c in readme_commands() if c[0] == "flowbp-train" and family_of(c) == "flux1")
    argv = [readme[0], str(ROOT / readme[1]),
            *(f"pretrained_model_name_or_path={folders['flux1']}" if a.startswith("pretrained_model_name_or_path=")
              else a for a in readme[2:] if not a.startswith("reward_kwargs.")), f"output_dir={tmp_path / 'out'}"]
    log = []
    proc = run_cli(argv, log)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith("flowbp-train: error: reward_kwargs.checkpoint_path: ")
    assert "Loading" not in proc.stdout + proc.stderr and not (tmp_path / "out").exists()


def test_a_text_encoder_cast_to_fp16_keeps_its_fp32_modules(folders):
    """T5 under fp16: the feed-forward output ``wo`` stays fp32 (transformers' _keep_in_fp32_modules)."""
    from flowbp_train.models.base import place_text_encoder

    t5 = _pipeline("flux1", folders["flux1"]).text_encoder_2
    place_text_encoder(t5, torch.device("cpu"), torch.float16)
    dtypes = {n: p.dtype for n, p in t5.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if ".wo." in n)
    assert all(d == torch.float16 for n, d in dtypes.items() if ".wo." not in n)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_that_match_nothing_stop_before_anything_loads(folders, family, monkeypatch):
    """``lora_target_modules`` checked against the folder's transformer built on the meta device from its
    config (no weights): one line naming the key, before the reward or any component is built."""
    import flowbp_train.models as models
    import flowbp_train.rewards as rewards
    from flowbp_train.config import ConfigError, from_dict
    from flowbp_train.preflight import preflight

    monkeypatch.setattr(rewards, "get_reward", lambda *a, **k: pytest.fail("the reward was built"))
    monkeypatch.setattr(models, "build_adapter", lambda *a, **k: pytest.fail("the model was loaded"))
    base = dict(family=family, pretrained_model_name_or_path=str(folders[family]), reward="mini", rank=4)
    preflight(from_dict({**base, "lora_target_modules": ["to_q"]}))  # a name the transformer has
    with pytest.raises(ConfigError, match=r"^lora_target_modules: 'attn\.to_qq' matches no module"):
        preflight(from_dict({**base, "lora_target_modules": ["to_q", "attn.to_qq"]}))


def _torchvision_works() -> bool:
    """``PixtralProcessor`` requires torchvision; a wheel built for another torch imports but lacks its ops."""
    try:
        import torchvision  # noqa: F401
        from torchvision.transforms import v2  # noqa: F401
    except Exception:  # noqa: BLE001 (any failure: a torchvision that does not work with this torch)
        return False
    return True


@pytest.mark.skipif(not _torchvision_works(), reason="PixtralProcessor needs a working torchvision")
def test_pixtral_processor_encodes_as_the_folder(folders):
    """FLUX.2-dev's published ``tokenizer/`` is a ``PixtralProcessor``: around the folder's tokenizer, saved
    and loaded with ``AutoProcessor``, it gives ``Flux2Pipeline`` the same token ids and mask for the
    pipeline's own messages, so the folder's prompt encoding is the published class's."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from transformers import AutoProcessor

    pipe = _pipeline("flux2-dev", folders["flux2-dev"])
    tf.pixtral_processor(pipe.tokenizer).save_pretrained(folders["flux2-dev"].parent / "pixtral")
    proc = AutoProcessor.from_pretrained(str(folders["flux2-dev"].parent / "pixtral"))
    assert type(proc).__name__ == "PixtralProcessor"
    kw = dict(add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt",
              padding="max_length", truncation=True, max_length=512)
    messages = format_input(prompts=tf.PROMPTS[:2], system_message=SYSTEM_MESSAGE)
    ours, theirs = pipe.tokenizer.apply_chat_template(messages, **kw), proc.apply_chat_template(messages, **kw)
    for key in ("input_ids", "attention_mask"):  # integers: equal exactly
        assert torch.equal(ours[key], theirs[key]), key
    assert 0 < int(ours["attention_mask"][0].sum()) < 512  # the prompt and system message fit, then padding
