"""``flowbp-eval``: sample a prompt set from a model adapter, score it with several rewards, write reports.

One image per prompt with a fixed per-prompt seed (``seed + index``), sampled with
``flowbp_kernels.rollout`` under no_grad (by default with each family's evaluation protocol,
:data:`EVAL_PROTOCOL`), decoded by the adapter, quantised to 8 bits (the PNG that is
written is exactly the image that is scored, so a resumed run scores saved images identically). Outputs
in ``output_dir``: ``images/<index>.png``, ``scores.csv`` (one row per prompt), ``summary.json`` (mean and
standard error ``std(ddof=1) / sqrt(n)`` per reward), ``grid.png``; given other runs, ``comparison.md``
and ``comparison.png``. Resumable: prompts already scored are skipped. The paper's protocol: train on one
reward (HPSv2.1) and report held-out rewards (PickScore, ImageReward) as a reward-hacking monitor.
GenEval-style detector metrics are out of scope. :func:`sample_images` writes the trainer's end-of-run
samples (``output_dir/samples/``) the same way: rollout, decode, 8-bit PNG.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from flowbp_kernels import rollout
from flowbp_train.models.base import FlowAdapter, encoded_where
from flowbp_train.rewards import Reward, get_reward

__all__ = ["EVAL_PROTOCOL", "compare_runs", "evaluate", "load_prompts", "main", "parse_reward_spec", "protocol",
           "sample_images", "summarize"]

CSV_NAME, SUMMARY_NAME, GRID_NAME = "scores.csv", "summary.json", "grid.png"
FIXED_COLUMNS = ["index", "seed", "prompt", "image"]
#: Each family's evaluation sampling, what flowbp-eval uses unless told otherwise: the authors' protocol
#: (shared/design/REFERENCE.md sections 1.5 and 6.1: SD3.5 40 steps at CFG 3.5, FLUX.1 and FLUX.2 50
#: steps at guidance 4.0, 512 px, bf16); the miniature samples as it trains (10 steps, CFG off, 16 px, fp32).
#: ``max_sequence_length`` None: the adapter's default (512 for every diffusers family).
EVAL_PROTOCOL: dict[str, dict] = {
    "flux1": {"num_steps": 50, "guidance_scale": 4.0, "resolution": 512, "dtype": "bf16"},
    "sd3": {"num_steps": 40, "guidance_scale": 3.5, "resolution": 512, "dtype": "bf16"},
    "flux2": {"num_steps": 50, "guidance_scale": 4.0, "resolution": 512, "dtype": "bf16"},
    "mini": {"num_steps": 10, "guidance_scale": 1.0, "resolution": 16, "dtype": "fp32"},
}
#: families without the authors' protocol sample as their model cards do, at the recipes' 512 px:
#: SD3.5-Large 28 steps at CFG 3.5, Qwen-Image 50 steps at true_cfg_scale 4.0
EVAL_PROTOCOL.update({
    "sd3-large": {"num_steps": 28, "guidance_scale": 3.5, "resolution": 512, "dtype": "bf16"},
    "qwen-image": {"num_steps": 50, "guidance_scale": 4.0, "resolution": 512, "dtype": "bf16"},
})
#: FLUX.2-dev and Z-Image: their pipelines' own defaults (50 steps; embedded guidance 4.0, resp. Z-Image's CFG
#: 5.0), at the 512 px the recipes train at (the FlowBP authors published no protocol for these models)
EVAL_PROTOCOL["flux2-dev"] = {"num_steps": 50, "guidance_scale": 4.0, "resolution": 512, "dtype": "bf16"}
EVAL_PROTOCOL["z-image"] = {"num_steps": 50, "guidance_scale": 5.0, "resolution": 512, "dtype": "bf16"}
#: settings of a family without an entry (a registered adapter): the adapter's own guidance and size
FALLBACK_PROTOCOL = {"num_steps": 28, "guidance_scale": None, "resolution": None, "dtype": "bf16"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file, one per line; blank lines and lines starting with ``#`` are skipped."""
    from flowbp_train.config import MAX_PROMPTS_BYTES
    from flowbp_train.yamlsafe import YamlError, read_text

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts: no such file {str(p)!r} (expected a text file, one prompt per line)")
    try:
        text = read_text(p, max_bytes=MAX_PROMPTS_BYTES)
    except YamlError as exc:
        raise ValueError(f"prompts: {exc}") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    prompts = [ln for ln in prompts if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts: {str(p)!r} contains no prompt")
    return prompts


def summarize(values: Sequence[float]) -> dict:
    """``{"n", "mean", "std", "stderr"}`` with ``std`` the sample std (ddof=1) and ``stderr = std/sqrt(n)``
    (``None`` when n < 2)."""
    a = np.asarray(values, dtype=np.float64)
    n = int(a.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "stderr": None}
    std = float(a.std(ddof=1)) if n > 1 else None
    return {"n": n, "mean": float(a.mean()), "std": std, "stderr": std / math.sqrt(n) if std is not None else None}


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _from_uint8(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _image_name(i: int) -> str:
    return f"images/{i:05d}.png"


def _read_rows(csv_path: Path) -> dict[int, dict]:
    """Rows of an earlier run's ``scores.csv``; a row that does not parse (index, seed) is dropped."""
    if not csv_path.is_file():
        return {}
    rows = {}
    with csv_path.open(newline="", encoding="utf-8", errors="replace") as f:
        for r in csv.DictReader(f):
            try:
                i, _ = int(r["index"]), int(r["seed"])
            except (KeyError, TypeError, ValueError):
                continue
            rows[i] = r
    return rows


def _inside(path: Path, root: Path) -> Path:
    """``path`` if it stays inside ``root`` once links are resolved; else ValueError naming it."""
    real, base = path.resolve(), root.resolve()
    if path.is_symlink() or (real != base and base not in real.parents):
        raise ValueError(f"--output-dir: {path} leads outside the output directory (to {real}); remove it")
    return path


def _write_rows(csv_path: Path, rows: Mapping[int, dict], reward_names: Sequence[str]) -> None:
    extra = sorted({k for r in rows.values() for k in r} - set(FIXED_COLUMNS) - set(reward_names))
    tmp = csv_path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIXED_COLUMNS + list(reward_names) + extra)
        w.writeheader()
        for i in sorted(rows):
            w.writerow(rows[i])
    os.replace(tmp, csv_path)


def _save_grid(paths: Sequence[Path], out: Path, max_images: int = 16) -> None:
    from PIL import Image

    ims = [Image.open(p).convert("RGB") for p in paths[:max_images]]
    if not ims:
        return
    w, h = ims[0].size
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for k, im in enumerate(ims):
        grid.paste(im.resize((w, h)), ((k % cols) * w, (k // cols) * h))
    grid.save(out)


def _reward_dict(rewards: Sequence[Reward] | Mapping[str, Reward]) -> dict[str, Reward]:
    items = list(rewards.items()) if isinstance(rewards, Mapping) else [(r.name, r) for r in rewards]
    out: dict[str, Reward] = {}
    for name, r in items:
        if not isinstance(r, Reward):
            raise TypeError(f"rewards: expected Reward instances, got {type(r).__name__}")
        if name in out or name in FIXED_COLUMNS:
            raise ValueError(f"rewards: duplicate or reserved reward name {name!r} (pass a dict to rename)")
        out[name] = r
    if not out:
        raise ValueError("rewards: expected at least one reward")
    return out


@torch.no_grad()
def evaluate(adapter: FlowAdapter, prompts: Sequence[str] | str | os.PathLike,
             rewards: Sequence[Reward] | Mapping[str, Reward], output_dir: str | os.PathLike, *,
             num_steps: int | None = None, seed: int = 0, batch_size: int = 4, name: str | None = None,
             compare_with: Sequence[str | os.PathLike] = (), progress: bool = True,
             grid_images: int = 16, weights: Mapping | None = None) -> dict:
    """Sample, score and report one run; returns the summary written to ``summary.json``.

    Args:
        adapter: a ``FlowAdapter`` (with its LoRA / fine-tuned transformer already loaded).
        prompts: a list of prompts or a text file (one prompt per line).
        rewards: ``Reward`` instances (column = ``reward.name``) or a dict column name -> reward.
        output_dir: where images, CSV, JSON and grid go; an existing run there is resumed.
        num_steps: sampling steps (the adapter's schedule; None: the family's protocol, EVAL_PROTOCOL);
            seed: prompt k uses ``seed + k``.
        batch_size: prompts sampled together; name: the run's label (default: the directory name).
        compare_with: other run directories to compare this run against (``comparison.md/.png``).
        progress: tqdm progress bar; grid_images: images in ``grid.png``.
        weights: what was loaded on top of the base model, recorded in the summary (flowbp-eval: the LoRA
            file and whether it holds the raw or the EMA weights, or the transformer weights).
    """
    if num_steps is None:
        num_steps = EVAL_PROTOCOL.get(getattr(adapter, "family", ""), FALLBACK_PROTOCOL)["num_steps"]
    if not isinstance(adapter, FlowAdapter):
        raise TypeError(f"adapter: expected a FlowAdapter, got {type(adapter).__name__}")
    prompt_list = load_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if not prompt_list or not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts: expected a non-empty list of str or a prompt file")
    for arg, v in (("num_steps", num_steps), ("batch_size", batch_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg}: expected a positive int, got {v!r}")
    reward_map = _reward_dict(rewards)
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    _inside(out / "images", out)
    csv_path = out / CSV_NAME
    rows = _read_rows(csv_path)
    foreign = 0
    for i, r in list(rows.items()):  # a row from another prompt set / seed is not reused
        if i < 0 or i >= len(prompt_list) or r.get("prompt") != prompt_list[i] or int(r["seed"]) != seed + i:
            del rows[i]
        elif r.get("image") != _image_name(i):  # only the images this tool wrote are ever opened
            del rows[i]
            foreign += 1
    if foreign:
        import warnings

        warnings.warn(f"{csv_path}: {foreign} rows name an image other than images/<index>.png; they are "
                      f"sampled again", stacklevel=2)

    def done(i: int) -> bool:
        r = rows.get(i)
        return r is not None and all(r.get(k) not in (None, "") for k in reward_map)

    todo = [i for i in range(len(prompt_list)) if not done(i)]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompt_list), initial=len(prompt_list) - len(todo), desc=f"eval {out.name}")
        except ImportError:
            bar = None
    from PIL import Image

    to_sample = [prompt_list[i] for i in todo if not (out / "images" / f"{i:05d}.png").is_file()]
    if to_sample:  # every prompt once, then free the text encoders
        adapter.encode_all(to_sample, batch_size)
        if progress and getattr(adapter, "encoded_prompts", 0):
            import sys

            print(f"flowbp-eval: encoded {adapter.encoded_prompts} prompts on {adapter.device} in "
                  f"{adapter.encode_seconds:.1f} s{encoded_where(adapter)}", file=sys.stderr, flush=True)
    sigmas = adapter.sigmas(num_steps)
    from flowbp_train.threads import rebalance

    for start in range(0, len(todo), batch_size):
        rebalance("flowbp-eval")  # a CPU run whose thread count flowbp-eval chose: follow the load
        idx = todo[start:start + batch_size]
        pngs = [_inside(out / _image_name(i), out) for i in idx]
        need = [k for k, p in enumerate(pngs) if not p.is_file()]
        arrays: list[np.ndarray | None] = [None] * len(idx)
        if need:
            batch_prompts = [prompt_list[idx[k]] for k in need]
            noise = torch.cat([adapter.initial_noise(1, torch.Generator().manual_seed(seed + idx[k])) for k in need])
            batch = adapter.encode_prompts(batch_prompts)
            roll = rollout(adapter.velocity_fn(batch, sigmas), noise.to(adapter.device), sigmas)
            for k, a in zip(need, _to_uint8(adapter.decode(roll.sample)), strict=True):
                Image.fromarray(a).save(pngs[k])
                arrays[k] = a
        for k, p in enumerate(pngs):  # saved earlier (resume): score exactly the saved pixels
            if arrays[k] is None:
                arrays[k] = np.asarray(Image.open(p).convert("RGB"))
        images = _from_uint8(arrays)
        batch_prompts = [prompt_list[i] for i in idx]
        scores = {k: r.score(images, batch_prompts).cpu().double().numpy() for k, r in reward_map.items()}
        for j, i in enumerate(idx):
            row = dict(rows.get(i, {}))
            row.update(index=i, seed=seed + i, prompt=prompt_list[i], image=_image_name(i))
            row.update({k: repr(float(v[j])) for k, v in scores.items()})
            rows[i] = row
        _write_rows(csv_path, rows, list(reward_map))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()

    summary = {
        "name": name or out.name,
        "num_prompts": len(prompt_list),
        "num_steps": num_steps,
        "seed": seed,
        "sampling": {"family": getattr(adapter, "family", None), "resolution": getattr(adapter, "resolution", None),
                     "guidance_scale": getattr(adapter, "guidance_scale", None),
                     "dtype": str(getattr(adapter, "dtype", "")).removeprefix("torch."),
                     "max_sequence_length": getattr(adapter, "max_sequence_length", None)},
        "weights": dict(weights) if weights else {"kind": "base"},
        "rewards": {k: summarize([float(rows[i][k]) for i in range(len(prompt_list))]) for k in reward_map},
    }
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    grid = [_inside(out / _image_name(i), out) for i in range(len(prompt_list))]
    _save_grid(grid, out / GRID_NAME, grid_images)
    if compare_with:
        compare_runs([out, *compare_with], out)
    return summary


@torch.no_grad()
def sample_images(adapter: FlowAdapter, prompts: Sequence[str], folder: str | os.PathLike, *, num_steps: int,
                  seed: int, latent_dtype: torch.dtype = torch.float32, write: bool = True) -> list[Path]:
    """The trainer's end-of-run samples: Euler samples (``num_steps``) of ``prompts`` one at a time, the
    noise drawn from one generator seeded ``seed``, as ``folder/sample_<i>.png`` plus ``prompts.txt``.
    ``write``: False on every rank but 0 (under FSDP2 every rank samples: its forwards are collective)."""
    from PIL import Image

    folder = Path(folder)
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    sigmas = adapter.sigmas(num_steps)
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i, prompt in enumerate(prompts):
        batch = adapter.encode_prompts([prompt])
        ro = rollout(adapter.velocity_fn(batch, sigmas), adapter.initial_noise(1, generator=gen), sigmas,
                     latent_dtype=latent_dtype)
        img = adapter.decode(ro.sample)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = folder / f"sample_{i:02d}.png"
        if write:
            Image.fromarray(img).save(path)
        paths.append(path)
    if write:
        (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return paths


def _fmt(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.4f} ± {s['stderr']:.4f}" if s.get("stderr") is not None else f"{s['mean']:.4f}"


def compare_runs(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> str:
    """Write ``comparison.md`` (mean ± standard error per run and reward) and ``comparison.png`` (bar chart
    with standard-error bars, one panel per reward) for runs with a ``summary.json``; returns the table."""
    if not run_dirs:
        raise ValueError("run_dirs: expected at least one run directory")
    summaries = []
    for d in run_dirs:
        f = Path(d) / SUMMARY_NAME
        if not f.is_file():
            raise FileNotFoundError(f"run_dirs: {str(d)!r} has no {SUMMARY_NAME} (run flowbp-eval there first)")
        summaries.append(json.loads(f.read_text(encoding="utf-8")))
    rewards = list(dict.fromkeys(k for s in summaries for k in s["rewards"]))
    lines = ["| run | n | " + " | ".join(rewards) + " |", "|---|---|" + "---|" * len(rewards)]
    for s in summaries:
        cells = [_fmt(s["rewards"].get(k)) for k in rewards]
        lines.append(f"| {s['name']} | {s['num_prompts']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text(table, encoding="utf-8")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rewards), figsize=(3.2 * len(rewards) + 1, 3.2), squeeze=False)
    names = [s["name"] for s in summaries]
    for ax, k in zip(axes[0], rewards, strict=True):
        means = [(s["rewards"].get(k) or {}).get("mean") or 0.0 for s in summaries]
        errs = [(s["rewards"].get(k) or {}).get("stderr") or 0.0 for s in summaries]
        ax.bar(range(len(names)), means, yerr=errs, capsize=3, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=100)
    plt.close(fig)
    return table


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """``"name"`` or ``"name:key=value,key=value"`` -> (name, kwargs); values are parsed as JSON when they
    can be (numbers, true/false), else kept as strings (paths)."""
    name, _, rest = spec.partition(":")
    if not name:
        raise ValueError(f"--reward: expected NAME[:key=value,...], got {spec!r}")
    kwargs: dict = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--reward: expected key=value in {spec!r}, got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return name, kwargs


def protocol(family: str, **given) -> dict:
    """The sampling settings of ``family``'s evaluation protocol (:data:`EVAL_PROTOCOL`) with every value
    in ``given`` that is not None on top: ``num_steps``, ``guidance_scale``, ``resolution``, ``dtype``."""
    out = {**FALLBACK_PROTOCOL, **EVAL_PROTOCOL.get(family, {})}
    unknown = set(given) - set(out)
    if unknown:
        raise TypeError(f"protocol: unknown settings {sorted(unknown)}")
    out.update({k: v for k, v in given.items() if v is not None})
    return out


def _load_lora(adapter: FlowAdapter, path: str, weights: str = "auto") -> dict:
    """Attach the LoRA of ``path`` (a file, a run folder or ``checkpoint-N``: its EMA weights when it has
    them, unless ``weights`` says otherwise); returns what was loaded, for the summary."""
    from flowbp_train.weights import read_lora_metadata, resolve_lora_file

    file, kind = resolve_lora_file(path, weights)
    _, info = read_lora_metadata(file)
    adapter.load_lora_weights(str(file))
    out = {"kind": "lora", "path": str(file), "lora_weights": kind}
    for key in ("step", "rank", "lora_alpha", "method"):
        if info and key in info:
            out[key] = info[key]
    return out


def _check_files(family: str, model: str, specs: list[tuple[str, dict]], prompts: str, *, lora: str | None = None,
                 lora_weights: str = "auto", transformer: str | None = None) -> None:
    """Every file the evaluation needs, before anything heavy loads (one line naming the argument)."""
    from flowbp_train.models import adapter_class
    from flowbp_train.rewards import check_reward_files
    from flowbp_train.weights import resolve_lora_file

    load_prompts(prompts)
    if lora is not None:
        resolve_lora_file(lora, lora_weights)
    if transformer is not None and not Path(transformer).exists():
        raise FileNotFoundError(f"--transformer: no such file or directory {transformer!r}")
    check = getattr(adapter_class(family), "check_files", None)
    if callable(check):
        check(model, key="--model")
    for name, kw in specs:
        check_reward_files(name, key_prefix=f"--reward {name}:", **kw)


def _check_args(a, specs: list[tuple[str, dict]]) -> None:
    """Every argument before any model loads; raises UsageError (one line naming the argument)."""
    from flowbp_train.config import MAX_BATCH, MAX_SAMPLE_STEPS, MAX_SEED, ConfigError, check_device, check_reward
    from flowbp_train.models import ADAPTERS
    from flowbp_train.usage import UsageError

    if a.family not in ADAPTERS:
        raise UsageError(f"--family: expected one of {', '.join(sorted(ADAPTERS))}, got {a.family!r}")
    if not a.model.strip():
        raise UsageError("--model: expected a model id or folder, got an empty value")
    for flag, val, lo, hi in (("--num-steps", a.num_steps, 1, MAX_SAMPLE_STEPS), ("--batch-size", a.batch_size, 1,
                              MAX_BATCH), ("--seed", a.seed, 0, MAX_SEED)):
        if not lo <= val <= hi:
            raise UsageError(f"{flag}: expected an integer in [{lo}, {hi}], got {val}")
    for flag, path in (("--lora", a.lora), ("--transformer", a.transformer)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag}: no such file or folder {path!r}")
    if Path(a.output_dir).is_file():
        raise UsageError(f"--output-dir: {a.output_dir} is a file, expected a folder")
    for d in a.compare_with:
        if not (Path(d) / SUMMARY_NAME).is_file():
            raise UsageError(f"--compare-with: {d!r} has no {SUMMARY_NAME} (run flowbp-eval there first)")
    try:
        load_prompts(a.prompts)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"--prompts: {str(exc).removeprefix('prompts: ')}") from None
    try:
        check_device(a.device)
    except ConfigError as exc:
        raise UsageError(f"--{exc}") from None
    for name, kw in specs:
        try:
            check_reward(name, kw)
        except ConfigError as exc:
            msg = str(exc).removeprefix("reward_kwargs.").removeprefix("reward: ")
            raise UsageError(f"--reward {name}: {msg}") from None


def main(argv: list[str] | None = None) -> int:
    """The ``flowbp-eval`` command line; ``flowbp-eval compare RUN... --output-dir D`` compares runs. A bad
    argument is one line on stderr and exit status 2."""
    from flowbp_train.usage import run_main

    return run_main("flowbp-eval", _main, argv)


def _main(argv: list[str] | None = None) -> int:
    import sys

    from flowbp_train.usage import ArgumentParser, UsageError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        ap = ArgumentParser(prog="flowbp-eval compare", description="Compare finished evaluation runs.")
        ap.add_argument("runs", nargs="+", help="run directories holding summary.json")
        ap.add_argument("--output-dir", required=True)
        a = ap.parse_args(argv[1:])
        try:
            table = compare_runs(a.runs, a.output_dir)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise UsageError(f"runs: {exc}") from None
        print(table, end="")
        return 0
    ap = ArgumentParser(prog="flowbp-eval", description=__doc__.split("\n")[0])
    ap.add_argument("--family", required=True, help="model family: flux1, sd3, flux2, mini")
    ap.add_argument("--model", "--pretrained_model_name_or_path", dest="model", required=True,
                    help="base model id or local path")
    ap.add_argument("--lora", help="LoRA weights: a file, a run folder or a checkpoint-N folder of flowbp-train")
    ap.add_argument("--lora-weights", "--lora_weights", dest="lora_weights", default="auto",
                    choices=["auto", "ema", "raw"],
                    help="which LoRA of a checkpoint: auto (the EMA weights when it has them), ema or raw")
    ap.add_argument("--transformer", help="fine-tuned transformer weights (.safetensors / directory)")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--reward", action="append", required=True, metavar="NAME[:key=value,...]",
                    help="a reward and its options, e.g. hpsv2:checkpoint_path=/w/HPS_v2.1_compressed.pt; repeat")
    ap.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True)
    ap.add_argument("--num-steps", "--num_steps", dest="num_steps", type=int, default=None,
                    help="sampling steps (default: the family's protocol: SD3.5 40, FLUX.1 / FLUX.2 50)")
    ap.add_argument("--guidance-scale", "--guidance_scale", dest="guidance_scale", type=float, default=None,
                    help="guidance (default: the family's protocol: SD3.5 3.5, FLUX.1 / FLUX.2 4.0)")
    ap.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; mini 16)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="transformer dtype (default bf16; the miniature fp32)")
    ap.add_argument("--max-sequence-length", "--max_sequence_length", dest="max_sequence_length", type=int,
                    default=None, help="text tokens (default: the family's, 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=4)
    ap.add_argument("--name", help="run label in comparisons (default: output directory name)")
    ap.add_argument("--compare-with", nargs="*", default=[], help="other run directories to compare against")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        specs = [parse_reward_spec(s) for s in a.reward]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for key, value in protocol(a.family, num_steps=a.num_steps,
                               guidance_scale=a.guidance_scale, resolution=a.resolution, dtype=a.dtype).items():
        setattr(a, key, value)
    _check_args(a, specs)
    try:  # every file, before the reward and the model load
        _check_files(a.family, a.model, specs, a.prompts, lora=a.lora, lora_weights=a.lora_weights,
                     transformer=a.transformer)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    from flowbp_train.threads import announce

    announce()  # the CPU thread settings chosen at start (flowbp_train.cli.eval_main), once the arguments hold
    rewards = {}
    for name, kw in specs:  # the rewards first: they fail in seconds, the model after minutes
        key = name if name not in rewards else f"{name}_{len(rewards)}"
        reward = get_reward(name, **kw).to(a.device)  # device as an option works too, for rewards taking one
        reward.clear_text_cache()
        rewards[key] = reward
    from flowbp_train.models import build_adapter

    kw = {k: getattr(a, k) for k in ("guidance_scale", "resolution", "max_sequence_length")
          if getattr(a, k) is not None}
    adapter = build_adapter(a.family, a.model, device=a.device, dtype=DTYPES[a.dtype], **kw)
    weights = None
    if a.transformer:
        from flowbp_train.weights import load_transformer_weights

        load_transformer_weights(adapter.transformer, a.transformer)
        weights = {"kind": "transformer", "path": str(a.transformer)}
    if a.lora:
        lora = _load_lora(adapter, a.lora, a.lora_weights)
        weights = lora if weights is None else {**weights, "lora": lora}
    summary = evaluate(adapter, a.prompts, rewards, a.output_dir, num_steps=a.num_steps, seed=a.seed,
                       batch_size=a.batch_size, name=a.name, compare_with=a.compare_with,
                       progress=not a.no_progress, weights=weights)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
