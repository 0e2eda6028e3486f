"""The miniature study: nine methods, three tasks, several seeds, through the real trainer, in parallel.

Each run is ``flowbp_train.trainer.Trainer`` built from a recipe of ``recipes/mini`` (the task's
folder; only the seed, the index sampler's seed, ``max_train_steps`` and the output folder change), and
the study calls its ``training_step()`` itself, evaluating on fixed seeds in between (the trainer's loop
is untouched). Tasks (:data:`TASKS`): ``digit`` (log p, saturating), ``shift`` and ``bold``
(``flowbp_train.rewards.mini``). Per task and seed, on one shared batch at the base model, every
method's gradient is compared with the exact one (``full``): cosine, the per-step decomposition (each
rollout step's piece against the total) and the bytes saved for backward. Jobs run in worker processes,
one thread each (``flowbp_train.threads.worker_policy``); ``benchmarks/mini_study.py`` is the command.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

#: The nine methods in the order of the tables (late-only first, then the multi-step ones).
METHOD_ORDER = ("refl", "draft-k", "draft-lv", "drtune", "full", "leapalign", "flowbp-sparse", "flowbp-bridge",
                "flowbp-lagrange")
#: The index sampler's seed of run ``seed`` is SAMPLER_SEED + seed (the trainer's default is 114 for
#: every run; one stream for all seeds would hide the plans' share of the seed-to-seed spread).
SAMPLER_SEED = 114
#: "Gain at step 10": how fast a method starts (the prototype's methods separated within 10 steps).
GAIN_STEP = 10
#: Evaluations at 0, 5, 10 and every 10 steps after (denser early, where the methods differ in speed).
EARLY_EVALS = (0, 5, 10)
EVAL_EVERY = 10
#: Plan draws per method for the gradient measures (each a fresh plan on the same batch).
DRAWS = 4
#: Seed of the shared gradient batch of run ``seed``: GRAD_SEED + seed (never a training stream).
GRAD_SEED = 50_000
#: Relative cost of a training step per method (the earlier study's step times), to start the longest
#: jobs first so that the workers finish together.
STEP_COST = {"full": 2.4, "flowbp-bridge": 1.25, "flowbp-lagrange": 1.1, "drtune": 1.0, "draft-lv": 1.0,
             "flowbp-sparse": 1.0, "leapalign": 0.9, "refl": 0.87, "draft-k": 0.72}


@dataclass(frozen=True)
class Task:
    """One column of the study: the reward every recipe of ``recipes`` trains on and its judges."""

    name: str
    reward: str  #: registry name of the training reward
    recipes: str  #: folder of the nine recipes, relative to the recipes root (``recipes/mini``)
    shift_px: int = 0  #: how far the task moves the digit (the re-centring judge moves it back)
    label: str = ""


TASKS = {
    "digit": Task("digit", "mini", ".", 0, "digit: log p (saturating; the quick start)"),
    "shift": Task("shift", "mini_shift", "shift", 3, "shift: log p - 0.5 (cx - 10.5)^2"),
    "bold": Task("bold", "mini_bold", "bold", 0, "bold: log p - 0.5 ((ink - 0.45) / 0.05)^2"),
}


def default_recipes_root() -> Path:
    """``recipes/mini`` of the checkout this package lives in (an editable install), else of the cwd."""
    here = Path(__file__).resolve().parents[3] / "recipes" / "mini"
    return here if here.is_dir() else Path("recipes/mini")


def recipe_path(root: str | Path, task: str, method: str) -> Path:
    return Path(root) / TASKS[task].recipes / f"{method}.yaml"


def eval_steps(steps: int) -> list[int]:
    """The steps evaluated in a run of ``steps`` steps (always 0 and ``steps``)."""
    return sorted({s for s in EARLY_EVALS if s <= steps} | set(range(0, steps + 1, EVAL_EVERY)) | {steps})


@dataclass
class StudyConfig:
    """Everything a study run varies; the methods' settings are the recipes', never changed per method."""

    steps: int = 50
    seeds: int = 3
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    methods: list[str] = field(default_factory=lambda: list(METHOD_ORDER))
    draws: int = DRAWS
    eval_per_prompt: int = 8
    batch_size: int | None = None  #: None: the recipes' (32); smaller only for smoke tests
    recipes_root: str = ""

    def validate(self) -> None:
        from flowbp_kernels import METHODS

        for name in ("steps", "seeds", "draws", "eval_per_prompt"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {v!r}")
        if self.eval_per_prompt < 2:
            raise ValueError(f"eval_per_prompt: expected >= 2 (diversity needs two samples a digit), got "
                             f"{self.eval_per_prompt}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int)
                                            or self.batch_size < 1):
            raise ValueError(f"batch_size: expected an integer >= 1 or None, got {self.batch_size!r}")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
        if not self.tasks or not self.methods:
            raise ValueError("tasks and methods: expected at least one of each")
        for t in self.tasks:
            for m in dict.fromkeys([*self.methods, "full"]):
                p = recipe_path(self.recipes_root, t, m)
                if not p.is_file():
                    raise FileNotFoundError(f"recipes_root: {p} not found (the study reads recipes/mini/"
                                            f"{TASKS[t].recipes}/<method>.yaml)")


# --------------------------------------------------------------------------------------- measurement
def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().double() for t in tensors])


def _cos(a, b) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    return None if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def _config(cfg: StudyConfig, task: str, method: str, seed: int, out: str):
    from flowbp_train.config import load_config

    over = {"seed": seed, "sampler_seed": SAMPLER_SEED + seed, "max_train_steps": cfg.steps, "output_dir": out,
            "progress_bar": False, "report_to": "none", "num_sample_images": 0, "device": "cpu"}
    if cfg.batch_size is not None:
        over["train_batch_size"] = cfg.batch_size
    tc = load_config(recipe_path(cfg.recipes_root, task, method), over)
    if tc.reward != TASKS[task].reward or tc.method != method or tc.family != "mini":
        raise ValueError(f"recipes_root: {recipe_path(cfg.recipes_root, task, method)} trains {tc.method} on "
                         f"{tc.reward!r} ({tc.family}), expected {method} on {TASKS[task].reward!r} (mini)")
    return tc


def _trainer(tc):
    """The trainer of one run; its start-up line (prompts encoded) is dropped: 100 runs would print it."""
    import contextlib
    import io

    from flowbp_train.trainer import Trainer

    with contextlib.redirect_stderr(io.StringIO()):
        return Trainer(tc)


_JUDGES: dict = {}


def _judges():
    if not _JUDGES:
        from flowbp_train.rewards.mini import DigitJudge, RecentredJudge

        _JUDGES["plain"] = DigitJudge()
        _JUDGES["recentred"] = {}
        _JUDGES["cls"] = RecentredJudge
    return _JUDGES


def evaluate_task(adapter, reward, task: str, per_prompt: int = 8) -> dict:
    """Score fixed evaluation seeds (every canonical prompt x ``per_prompt``): the task's reward and its
    terms, the judge and, for a task that moves the digit, the re-centring judge, the ink's centre and
    amount, diversity, total variation and high-frequency energy."""
    from flowbp_train.digits import canonical_prompts, digits_of_prompts
    from flowbp_train.mini.metrics import image_stats
    from flowbp_train.mini.report import eval_noise, generate
    from flowbp_train.rewards.mini import ink_centre_x, ink_mean

    prompts = canonical_prompts()
    rows = [p for p in prompts for _ in range(per_prompt)]
    x = generate(adapter, rows, eval_noise(adapter, len(prompts), per_prompt))
    with torch.no_grad():
        images = adapter.decode(x)
        m = {"reward": float(reward.score(images, rows).mean())}
        if callable(getattr(reward, "terms", None)):
            m.update({f"term_{k}": float(v.mean()) for k, v in reward.terms(images, rows).items()})
        j = _judges()
        m["judge"] = float(j["plain"].score(images, rows).mean())
        shift = TASKS[task].shift_px
        if shift:
            if shift not in j["recentred"]:
                j["recentred"][shift] = j["cls"](shift_px=shift)
            m["judge_recentred"] = float(j["recentred"][shift].score(images, rows).mean())
        m["ink_cx"] = float(ink_centre_x(images).mean())
        m["ink_mean"] = float(ink_mean(images).mean())
    m.update(image_stats(x.clamp(-1, 1), digits_of_prompts(rows)))
    return m


def train_run(cfg: StudyConfig, task: str, method: str, seed: int) -> dict:
    """One training run through the trainer, evaluated at :func:`eval_steps`; returns its record."""
    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix=f"flowbp-study-{task}-{method}-{seed}-")
    try:
        trainer = _trainer(_config(cfg, task, method, seed, out))
        try:
            at = set(eval_steps(cfg.steps))
            evals = {0: evaluate_task(trainer.adapter, trainer.reward, task, cfg.eval_per_prompt)}
            train, times = [], []
            for step in range(1, cfg.steps + 1):
                rec = trainer.training_step()
                times.append(rec["step_time"])
                train.append({k: v for k, v in rec.items() if k in ("step", "reward", "loss", "grad_norm", "skipped")
                              or k.startswith("reward_")})
                if step in at:
                    evals[step] = evaluate_task(trainer.adapter, trainer.reward, task, cfg.eval_per_prompt)
        finally:
            trainer.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"kind": "train", "task": task, "method": method, "seed": seed, "evals": evals, "train": train,
            "step_time_median_s": statistics.median(times), "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - t0}


def gradient_run(cfg: StudyConfig, task: str, seed: int) -> dict:
    """On one batch at the base model (LoRA as the trainer initialises it for ``seed``): the exact gradient
    and, per method, ``draws`` plans' gradients: cosines to the exact one, the per-step decomposition
    (each rollout step's parameter-gradient piece, summed over the draws, against the total and against
    the exact gradient) and the bytes saved for backward (streaming and retain executors)."""
    from flowbp_kernels import get_method, reward_backprop, rollout
    from flowbp_train.mini.measure import flat_grad, saved_bytes_meter

    t0 = time.perf_counter()
    out = tempfile.mkdtemp(prefix=f"flowbp-study-grad-{task}-{seed}-")
    try:
        trainer = _trainer(_config(cfg, task, "full", seed, out))
        try:
            ad, reward, params = trainer.adapter, trainer.reward, trainer.params
            n = trainer.cfg.num_steps
            gen = torch.Generator().manual_seed(GRAD_SEED + seed)
            idx = torch.randint(len(trainer.prompts), (trainer.cfg.train_batch_size,), generator=gen)
            prompts = [trainer.prompts[i] for i in idx.tolist()]
            sig = ad.sigmas(n)
            vf = ad.velocity_fn(ad.encode_prompts(prompts), sig)
            ro = rollout(vf, ad.initial_noise(len(prompts), generator=gen), sig)
            exclude = list(ad.transformer.parameters()) + list(reward.parameters())

            def rfn(x):
                return reward.score(ad.decode(x), prompts)

            def grad(method, plan, noise, executor="streaming"):
                for p in params:
                    p.grad = None
                with saved_bytes_meter(exclude) as stats:
                    o = reward_backprop(method, vf, ro, rfn, plan=plan, executor=executor, loss="neg",
                                        params=params, keep_node_grads=executor == "streaming",
                                        noise_generator=noise)  # DRaFT-LV's re-noising
                total = flat_grad(params)
                pieces = {}
                if executor == "streaming":
                    for node, vecs in zip(o.diagnostics["nodes"], o.diagnostics["node_grads"]):
                        v = _flat(vecs)
                        pieces[node["index"]] = pieces.get(node["index"], 0) + v
                return total, pieces, stats["peak"], o.diagnostics["num_reforwards"]

            res = {}
            exact = None
            for name in dict.fromkeys(["full", *cfg.methods]):
                tc = _config(cfg, task, name, seed, out)
                method = get_method(name, **tc.method_options)
                sampler = torch.Generator().manual_seed(GRAD_SEED + 1000 * seed + 17)
                noise = torch.Generator().manual_seed(GRAD_SEED + 1000 * seed + 29)
                sums, total_sum, cosines, norms, rel_errs = {}, 0, [], [], []
                bytes_stream = bytes_retain = reforwards = None
                for d in range(1 if name == "full" else cfg.draws):
                    plan = method.plan(n, sampler)
                    g, pieces, peak, nref = grad(method, plan, noise)
                    if d == 0:
                        bytes_stream, reforwards = peak, nref
                        _, _, bytes_retain, _ = grad(method, plan, noise, "retain")
                    if exact is None:
                        exact = g
                    cosines.append(_cos(g, exact))
                    norms.append(float(g.norm() / exact.norm()))
                    total_sum = total_sum + g
                    rel_errs.append(float((sum(pieces.values()) - g).norm() / g.norm().clamp_min(1e-30)))
                    for i, v in pieces.items():
                        sums[i] = sums.get(i, 0) + v
                norm_all = sum(float(v.norm()) for v in sums.values()) or 1.0
                res[name] = {
                    "cos_vs_exact": statistics.fmean(c for c in cosines if c is not None) if any(
                        c is not None for c in cosines) else None,
                    "cos_mean_grad_vs_exact": _cos(total_sum, exact),
                    "grad_norm_ratio": statistics.fmean(norms),
                    "saved_bytes_streaming": bytes_stream, "saved_bytes_retain": bytes_retain,
                    "reforwards": reforwards, "pieces_rel_err": max(rel_errs),
                    "steps": {str(i): {"cos_to_own_total": _cos(v, total_sum), "cos_to_exact": _cos(v, exact),
                                       "norm_share": float(v.norm()) / norm_all} for i, v in sorted(sums.items())},
                }
        finally:
            trainer.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"kind": "grad", "task": task, "seed": seed, "methods": res, "num_steps": n,
            "seconds": time.perf_counter() - t0}


def _job(args: tuple) -> dict:
    """What a worker runs (module level, so a spawned process can import it)."""
    kind, cfg, *rest = args
    return train_run(cfg, *rest) if kind == "train" else gradient_run(cfg, *rest)


def _jobs(cfg: StudyConfig) -> list[tuple]:
    """Every job, task by task in ``cfg.tasks`` order and seed by seed within a task, so that a study
    stopped early has whole tasks, and every method at the seeds it reached, in its journal; within a seed
    the gradient measures first, then the training runs costliest first (the last jobs to start are short)."""
    jobs = []
    for t in cfg.tasks:
        for s in range(cfg.seeds):
            jobs.append(("grad", cfg, t, s))
            jobs += [("train", cfg, t, m, s) for m in sorted(cfg.methods, key=lambda m: -STEP_COST.get(m, 1.0))]
    return jobs


def _job_key(kind: str, task: str, *rest) -> str:
    """A job's name in the journal: ``train/shift/refl/0`` or ``grad/shift/0``."""
    return "/".join(str(x) for x in (kind, task, *rest))


def _result_key(r: dict) -> str:
    return _job_key("train", r["task"], r["method"], r["seed"]) if r["kind"] == "train" else \
        _job_key("grad", r["task"], r["seed"])


#: The journal of a study (``out_dir/jobs.jsonl``): its configuration on the first line, then one line
#: per finished job, written as each finishes, so a stopped study keeps its finished runs (``resume``).
JOURNAL = "jobs.jsonl"


def _journal_config(cfg: StudyConfig) -> dict:
    """What changes a job's result (a job is one task, method and seed whatever else the study runs, so a
    journal serves a study of fewer or more tasks, methods or seeds)."""
    return {k: getattr(cfg, k) for k in ("steps", "draws", "eval_per_prompt", "batch_size")}


def _read_journal(path: Path, cfg: StudyConfig) -> list[dict]:
    """The finished jobs of an earlier run of the same configuration (none for another configuration or
    an unreadable journal; a line cut short by a kill is dropped)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    try:
        saved = json.loads(lines[0]).get("config") if lines else None
    except json.JSONDecodeError:
        return []
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in _journal_config(cfg).items()):
        return []
    done = []
    for line in lines[1:]:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("kind") == "train":
            r["evals"] = {int(k): v for k, v in r["evals"].items()}
        done.append(r)
    return done


# ---------------------------------------------------------------------------------------- the study
def run_study(cfg: StudyConfig | None = None, *, workers: int | None = None,
              out_dir: str | Path = "benchmarks/results/mini_study", markdown: str | Path | None = None,
              log: Callable[[str], None] = print, resume: bool = False, run: bool = True) -> dict:
    """Run every job (in ``workers`` processes; 1: in this process), aggregate, and write ``study.json``,
    ``curves.png`` and ``decomposition.png`` into ``out_dir`` and the tables to ``markdown`` (if given).
    Each finished job is appended to ``out_dir/jobs.jsonl``; ``resume`` skips the jobs that journal
    already holds for the same configuration; ``run=False`` (with ``resume``) runs nothing and reports
    what the journal holds, naming the jobs it lacks (a study stopped early).
    Returns ``{"info", "aggregate", "runs", "gradients"}``."""
    from flowbp_train.threads import worker_policy

    cfg = cfg or StudyConfig()
    if not cfg.recipes_root:
        cfg = StudyConfig(**{**asdict(cfg), "recipes_root": str(default_recipes_root())})
    cfg.validate()
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    journal = out / JOURNAL
    wanted = _jobs(cfg)
    keys = {_job_key(j[0], *j[2:]) for j in wanted}
    old = _read_journal(journal, cfg) if resume else []
    results = [r for r in old if _result_key(r) in keys  # a gradient job measured a list of methods
               and (r["kind"] == "train" or set(cfg.methods) <= set(r["methods"]))]
    done = {_result_key(r) for r in results}
    jobs = [j for j in wanted if _job_key(j[0], *j[2:]) not in done]
    missing = [] if run else [_job_key(j[0], *j[2:]) for j in jobs]
    if not run:
        jobs = []
    with journal.open("w") as fh:  # rewritten whole: the configuration, then every finished job it had
        fh.write(json.dumps({"config": _journal_config(cfg)}) + "\n")
        for r in old:
            fh.write(json.dumps(r) + "\n")
    kept = len(results)
    if kept:
        log(f"mini-study: {kept} finished jobs kept from {journal}")

    def finished(r: dict) -> None:
        results.append(r)
        with journal.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        _log_job(r, t_start, log)
        bar.update(1)
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    policy, workers = worker_policy("mini-study", workers)
    workers = max(1, min(workers, len(jobs) or 1))
    log(f"mini-study: {len(jobs)} jobs ({len(cfg.tasks)} tasks x {len(cfg.methods)} methods x {cfg.seeds} seeds, "
        f"{cfg.steps} steps; gradient measures per task and seed) on {workers} worker(s)")
    from tqdm.auto import tqdm

    try:
        bar = tqdm(total=len(jobs), desc="mini-study", unit="job")
        if workers == 1:
            prev = torch.get_num_threads()
            torch.set_num_threads(policy.threads or prev)
            try:
                for j in jobs:
                    finished(_job(j))
            finally:
                torch.set_num_threads(prev)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(_job, j) for j in jobs]
                for f in as_completed(futures):
                    finished(f.result())
        bar.close()
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    runs = sorted((r for r in results if r["kind"] == "train"), key=lambda r: (r["task"], r["method"], r["seed"]))
    grads = sorted((r for r in results if r["kind"] == "grad"), key=lambda r: (r["task"], r["seed"]))
    agg = aggregate(runs, grads, cfg)
    info = {**asdict(cfg), "batch_size": cfg.batch_size or 32, "eval_steps": eval_steps(cfg.steps),
            "workers": workers, "threads_per_worker": policy.threads,
            "thread_policy": policy.note if run else "a report of the journal (no job run by it)",
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": policy.cores, "git": _git_rev(), "total_seconds": time.perf_counter() - t_start,
            "kept_jobs": kept, "missing_jobs": missing, "job_seconds": sum(r["seconds"] for r in results),
            "tasks_info": {t: asdict(TASKS[t]) for t in cfg.tasks}}
    study = {"info": info, "aggregate": agg, "runs": runs, "gradients": grads}
    (out / "study.json").write_text(json.dumps(study, indent=1) + "\n")
    plot_curves(agg, runs, cfg, out / "curves.png")
    plot_decomposition(agg, cfg, out / "decomposition.png")
    text = markdown_report(agg, info)
    if markdown:
        Path(markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown).write_text(text)
    log(text)
    return study


def _log_job(r: dict, t0: float, log) -> None:
    if r["kind"] == "train":
        e = r["evals"]
        last = max(e, key=int)
        log(f"  {r['task']}/{r['method']}/seed {r['seed']}: eval reward {e[0]['reward']:.3f} -> {e[last]['reward']:.3f}"
            f", judge {e[last]['judge']:.3f}, {r['step_time_median_s'] * 1e3:.0f} ms/step "
            f"({time.perf_counter() - t0:.0f} s)")
    else:
        cos = ", ".join(f"{m} {v['cos_vs_exact']:.2f}" for m, v in r["methods"].items()
                        if v["cos_vs_exact"] is not None)
        log(f"  {r['task']}/gradients/seed {r['seed']}: cos vs exact {cos} ({time.perf_counter() - t0:.0f} s)")


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------- aggregate
def _mean_sd(xs) -> list[float] | None:
    xs = [float(x) for x in xs if x is not None and math.isfinite(float(x))]
    if not xs:
        return None
    return [statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0]


def _auc(evals: dict) -> float:
    """Area under the eval reward curve above its start, divided by the steps: the mean gain over the run
    (trapezoids over the evaluated steps)."""
    steps = sorted(int(s) for s in evals)
    r0 = evals[steps[0]]["reward"]
    area = sum((b - a) * ((evals[a]["reward"] + evals[b]["reward"]) / 2 - r0) for a, b in zip(steps, steps[1:]))
    return area / max(1, steps[-1] - steps[0])


def aggregate(runs: list[dict], grads: list[dict], cfg: StudyConfig) -> dict:
    """Per task and method: mean and sd over seeds of every reported quantity; the ordering by final
    reward with each gap in pooled seed sds."""
    agg = {}
    for t in cfg.tasks:
        rows = {}
        for m in cfg.methods:
            rs = [r for r in runs if r["task"] == t and r["method"] == m]
            gs = [g["methods"][m] for g in grads if g["task"] == t and m in g["methods"]]
            if not rs:
                continue
            last = max(int(s) for s in rs[0]["evals"])
            g_step = min(GAIN_STEP, last)
            final = [r["evals"][last] for r in rs]
            row = {"final_reward": _mean_sd(e["reward"] for e in final),
                   "gain_at": g_step,
                   "gain": _mean_sd(r["evals"][g_step]["reward"] - r["evals"][0]["reward"] for r in rs),
                   "auc": _mean_sd(_auc(r["evals"]) for r in rs),
                   "base_reward": _mean_sd(r["evals"][0]["reward"] for r in rs),
                   "step_time_s": _mean_sd(r["step_time_median_s"] for r in rs)}
            for key in final[0]:
                if key != "reward":
                    row[key] = _mean_sd(e.get(key) for e in final)
                    row[f"base_{key}"] = _mean_sd(r["evals"][0].get(key) for r in rs)
            row["curve"] = {s: _mean_sd(r["evals"][s]["reward"] for r in rs if s in r["evals"])
                            for s in sorted(rs[0]["evals"], key=int)}
            for key in ("cos_vs_exact", "cos_mean_grad_vs_exact", "grad_norm_ratio", "saved_bytes_streaming",
                        "saved_bytes_retain", "reforwards", "pieces_rel_err"):
                row[key] = _mean_sd(g[key] for g in gs)
            row["decomposition"] = _decomposition(gs)
            rows[m] = row
        order = sorted(rows, key=lambda m: -rows[m]["final_reward"][0])
        gaps = []
        for a, b in zip(order, order[1:]):
            sa, sb = rows[a]["final_reward"][1], rows[b]["final_reward"][1]
            pooled = math.sqrt((sa ** 2 + sb ** 2) / 2)
            diff = rows[a]["final_reward"][0] - rows[b]["final_reward"][0]
            gaps.append({"above": a, "below": b, "diff": diff, "pooled_sd": pooled,
                         "in_sd": diff / pooled if pooled > 0 else None})
        for row in rows.values():  # effect sizes against the late-only baseline and the exact gradient
            for ref in ("refl", "full"):
                row[f"vs_{ref}_in_sd"] = _effect(row["final_reward"], rows[ref]["final_reward"]) if ref in rows \
                    else None
        exact = [g["methods"]["full"] for g in grads if g["task"] == t and "full" in g["methods"]]
        paired = [(rows[m]["cos_vs_exact"][0], rows[m]["final_reward"][0]) for m in rows if rows[m]["cos_vs_exact"]]
        agg[t] = {"methods": rows, "order": order, "gaps": gaps, "exact_decomposition": _decomposition(exact),
                  "spearman_cos_reward": _spearman(*zip(*paired)) if len(paired) > 2 else None}
    return agg


def _effect(a: list[float] | None, b: list[float] | None) -> float | None:
    """(mean a - mean b) in pooled seed sds (Cohen's d over the seeds); None when both sds are 0."""
    if a is None or b is None:
        return None
    pooled = math.sqrt((a[1] ** 2 + b[1] ** 2) / 2)
    return (a[0] - b[0]) / pooled if pooled > 0 else None


def _ranks(xs) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _spearman(xs, ys) -> float | None:
    """Spearman's rank correlation (Pearson's on the ranks, ties at their mean rank)."""
    rx, ry = _ranks(list(xs)), _ranks(list(ys))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _decomposition(gs: list[dict]) -> dict:
    """Per rollout step: mean and sd over seeds of the piece's cosines and norm share, and in how many
    seeds the method reached the step at all (``seen``)."""
    steps = sorted({int(i) for g in gs for i in g["steps"]})
    out = {}
    for i in steps:
        have = [g["steps"][str(i)] for g in gs if str(i) in g["steps"]]
        out[str(i)] = {k: _mean_sd(h[k] for h in have) for k in ("cos_to_own_total", "cos_to_exact", "norm_share")}
        out[str(i)]["seen"] = len(have)
    return out


# -------------------------------------------------------------------------------------------- output
def _f(pair, fmt="{:.3f}", sd=True) -> str:
    if pair is None:
        return "-"
    return f"{fmt.format(pair[0])} ± {fmt.format(pair[1])}" if sd else fmt.format(pair[0])


def markdown_report(agg: dict, info: dict) -> str:
    """The study's tables: per task one row per method, then the per-step decomposition."""
    lines = [
        f"Miniature study: {info['steps']} trainer steps per run (recipes/mini: batch {info['batch_size']}, "
        f"10-step rollouts, LoRA rank 8, lr 1e-3; only the seed changes), {info['seeds']} seeds "
        f"(mean ± sd over seeds), evaluated on {10 * info['eval_per_prompt']} fixed samples at steps "
        f"{', '.join(map(str, info['eval_steps']))}; "
        f"{info['thread_policy']}; torch {info['torch']}, git {info['git']}; "
        f"total {info['total_seconds'] / 60:.1f} min"
        + (f" (jobs together {info['job_seconds'] / 60:.1f} worker-min)." if info.get("job_seconds") else "."), ""]
    if info.get("missing_jobs"):
        lines[0] += (f" **Incomplete:** {len(info['missing_jobs'])} jobs never ran (the study was stopped): "
                     f"{', '.join(info['missing_jobs'])}.")
    for t, a in agg.items():
        rows = a["methods"]
        if not rows:
            continue
        first = next(iter(rows.values()))
        term_keys = [k for k in first if k.startswith("term_")]
        has_rc = "judge_recentred" in first
        lines.append(f"### Task {TASKS[t].label}")
        lines.append("")
        base = (f"Base model: reward {first['base_reward'][0]:.3f}, judge {first['base_judge'][0]:.3f}"
                + (f", re-centred judge {first['base_judge_recentred'][0]:.3f}" if has_rc else "")
                + f", ink centre {first['base_ink_cx'][0]:.2f}, mean ink {first['base_ink_mean'][0]:.3f}, "
                f"diversity {first['base_diversity'][0]:.2f}.")
        lines += [base, ""]
        head = (["method", "final reward", f"gain at {first['gain_at']}", "mean gain (AUC)"]
                + [k.removeprefix("term_") for k in term_keys] + ["judge"] + (["re-centred judge"] if has_rc else [])
                + ["ink centre", "mean ink", "diversity", "TV", "cos(grad, exact)", "cos(mean of draws, exact)",
                   "saved MB stream / retain", "step ms", "vs refl (sd)", "vs full (sd)"])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m in sorted(rows, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            r = rows[m]
            cells = ([m, _f(r["final_reward"]), _f(r["gain"]), _f(r["auc"])] + [_f(r[k]) for k in term_keys]
                     + [_f(r["judge"])] + ([_f(r["judge_recentred"])] if has_rc else [])
                     + [_f(r["ink_cx"], "{:.2f}"), _f(r["ink_mean"]), _f(r["diversity"], "{:.2f}"),
                        _f(r["total_variation"]), _f(r["cos_vs_exact"], "{:.2f}"),
                        _f(r["cos_mean_grad_vs_exact"], "{:.2f}"),
                        (f"{r['saved_bytes_streaming'][0] / 2**20:.1f} / {r['saved_bytes_retain'][0] / 2**20:.1f}"
                         if r["saved_bytes_streaming"] else "-"),
                        f"{r['step_time_s'][0] * 1e3:.0f}"]
                     + [f"{r[k]:+.1f}" if r.get(k) is not None else "-" for k in ("vs_refl_in_sd", "vs_full_in_sd")])
            lines.append("| " + " | ".join(cells) + " |")
        order = " > ".join([a["order"][0]] + [
            f"{g['below']} ({g['in_sd']:.1f} sd)" if g["in_sd"] is not None else g["below"] for g in a["gaps"]])
        rho = a.get("spearman_cos_reward")
        lines += ["", f"Ordering by final reward (gap to the method above in pooled seed sds): {order}."
                  + (f" Spearman rank correlation of cos(grad, exact) with the final reward: {rho:.2f}." if rho
                     is not None else ""), ""]
    lines.append("Per-step decomposition at the base model (one batch per seed, "
                 f"{info['draws']} plan draws per method, summed): cosine of each rollout step's piece of the "
                 "gradient (step 0 = the noise end) with the exact gradient; `.` where the method never reaches "
                 "the step.")
    errs = [r["pieces_rel_err"][0] + r["pieces_rel_err"][1] for a in agg.values() for r in a["methods"].values()
            if r.get("pieces_rel_err")]
    if errs:
        lines[-1] += (f" The pieces add up to each method's own gradient (relative error, mean + sd over seeds, "
                      f"at most {max(errs):.1e}), so the decomposition misses nothing.")
    for t, a in agg.items():
        if not a["exact_decomposition"]:
            continue
        n = max(int(i) for i in a["exact_decomposition"]) + 1
        lines += ["", f"**{t}**", "", "| method | " + " | ".join(str(i) for i in range(n)) + " |",
                  "|" + "---|" * (n + 1)]
        for label, dec in _decomposition_rows(a):
            cells = [f"{dec[str(i)]['cos_to_exact'][0]:.2f}" if str(i) in dec and dec[str(i)]["cos_to_exact"]
                     else "." for i in range(n)]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _decomposition_rows(a: dict) -> list[tuple[str, dict]]:
    rows = a["methods"]
    return [("exact (full)", a["exact_decomposition"])] + [
        (m, rows[m]["decomposition"]) for m in METHOD_ORDER if m in rows and m != "full"]


def plot_curves(agg: dict, runs: list[dict], cfg: StudyConfig, path: str | Path) -> Path:
    """One panel per task: the eval reward against the step (mean over seeds, band of one sd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(agg), figsize=(5.2 * len(agg), 3.8), squeeze=False)
    for ax, (t, a) in zip(axes[0], agg.items()):
        for m in [m for m in METHOD_ORDER if m in a["methods"]]:
            curve = a["methods"][m]["curve"]
            xs = sorted(curve, key=int)
            mean = [curve[s][0] for s in xs]
            sd = [curve[s][1] for s in xs]
            steps = [int(s) for s in xs]
            (line,) = ax.plot(steps, mean, marker="o", ms=2.5, lw=1.2, label=m)
            ax.fill_between(steps, [u - v for u, v in zip(mean, sd)], [u + v for u, v in zip(mean, sd)],
                            color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(TASKS[t].label, fontsize=8)
        ax.set_xlabel("trainer step")
        ax.set_ylabel("eval reward")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decomposition(agg: dict, cfg: StudyConfig, path: str | Path) -> Path:
    """One heat map per task: rows exact + methods, columns rollout steps, colour = cosine of the step's
    piece with the exact gradient (blank where the method never reaches the step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in agg if agg[t]["exact_decomposition"]]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.6 * max(1, len(tasks)), 3.9), squeeze=False)
    im = None
    for ax, t in zip(axes[0], tasks):
        named = _decomposition_rows(agg[t])
        n = max(int(i) for i in agg[t]["exact_decomposition"]) + 1
        grid = np.full((len(named), n), np.nan)
        for r, (_, dec) in enumerate(named):
            for i, v in dec.items():
                if v["cos_to_exact"] is not None:
                    grid[r, int(i)] = v["cos_to_exact"][0]
        im = ax.imshow(grid, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
        ax.set_yticks(range(len(named)))
        ax.set_yticklabels([label for label, _ in named], fontsize=7)
        ax.set_xticks(range(n))
        ax.set_xlabel("rollout step (0 = noise end)")
        ax.set_title(t, fontsize=9)
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="cos(step piece, exact gradient)")
    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
