"""``plan_memory``: the peak GPU memory of a training config, where it is set, and what would make it fit.

One simulated run (``simulate.py``: loading and the trainer's setup with its prompt encoding, one training
step, one sample step; rank 0 of ``world_size`` ranks) gives the live bytes: the peak, its phase, bytes
by category, each stage's peak. The allocation trace replayed through the caching-allocator model
(``allocator.py``) gives what the allocator would hold (allocated, reserved); the fixed costs outside it
are added. The fit answer is a second replay with the allocator limited to the GPU less the fixed costs
(a full cache is released and retried, as PyTorch does, before it gives up). When it does not fit,
candidate changes (real trainer options only, cheapest first: exact ones, then same result slower, then
lossy) are simulated in turn until one fits; a candidate is skipped without simulating it when, even
with everything it could save removed from the live bytes of some stage's peak, that stage would not fit
(each candidate names the categories and stages it can reach). All figures are simulated, not measured.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from flowbp_train.memory.allocator import NCCL_BYTES_PER_RANK, GiB, fixed_costs, replay
from flowbp_train.memory.simulate import STAGES, Simulation
from flowbp_train.memory.tracker import CATEGORIES

#: Placeholder model path for validation when a recipe leaves it null: the shipped architecture is used.
PUBLISHED = "<published architecture>"
#: what a change that only alters the training step (executor, checkpointing, batch...) can reach
_STEP = ("training step",)
_TRANSIENT = ("activations", "recomputation", "temporaries")


@dataclass
class Suggestion:
    """A change of config keys, why it costs little, and its simulated total (bytes).

    ``status``: "fits" / "does not fit" (simulated), "skipped" (``reason`` says why it cannot fit without
    simulating it), "not tried" (a cheaper change fits). ``saving``: the most it can remove from the live
    bytes of a stage's peak, ``f(stage, breakdown at that peak, plan) -> bytes`` (None: no bound, always
    simulated).
    """

    overrides: dict
    cost: str  # "exact", "slower", "lossy" or "combined"
    why: str
    total_bytes: int = 0
    fits: bool = False
    status: str = "not tried"
    reason: str = ""
    seconds: float = 0.0
    saving: Callable | None = field(default=None, repr=False, compare=False)

    @property
    def command(self) -> str:
        return " ".join(f"{k}={_yaml(v)}" for k, v in self.overrides.items())

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "saving"} | {"command": self.command}


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class MemoryPlan:
    """The simulated memory of one run of a config (setup, one training step, one sample step), per GPU.

    Attributes:
        world_size / strategy: the ranks planned and how the transformer is wrapped ("none", "ddp",
            "fsdp2"); the figures are those of rank 0 (the largest prompt shard; FSDP2 pads every rank's
            shards to the same size).
        peak_bytes / peak_phase / peak_stage: high-water mark of the live tensor bytes, the phase and the
            stage (``simulate.STAGES``) that set it.
        breakdown: bytes by category at that peak (``tracker.CATEGORIES``).
        stage_peaks: the highest live bytes of each stage; phase_peaks: of each phase.
        allocated_bytes / reserved_bytes: the caching-allocator replay's peaks over the whole run.
        fixed: memory outside the allocator (CUDA context, workspaces, NCCL), by name.
        total_bytes: ``reserved + sum(fixed)``: what the GPU shows when it has room to spare.
        host_peak_bytes: host (CPU) memory of what the trainer keeps there (text encoders, prompt cache).
        fits: None without ``gpu_memory``; fit_detail: why; suggestions: the candidate changes, each
            simulated, skipped (with the reason) or not tried (a cheaper one fits).
    """

    family: str
    resolution: int
    batch: int
    method: str
    executor: str
    world_size: int
    strategy: str
    peak_bytes: int
    peak_phase: str
    peak_stage: str
    breakdown: dict[str, int]
    stage_peaks: dict[str, int]
    phase_peaks: dict[str, int]
    allocated_bytes: int
    reserved_bytes: int
    reserved_phase: str
    fixed: dict[str, int]
    host_peak_bytes: int
    weights: dict[str, int]
    seconds: float
    source: str
    node_backwards: int = 0
    gpu_memory_bytes: int | None = None
    fits: bool | None = None
    fit_detail: str = ""
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    answer_seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.reserved_bytes + sum(self.fixed.values())

    @property
    def sample_peak_bytes(self) -> int:
        return self.stage_peaks.get("sample step", 0)

    def to_dict(self) -> dict:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "suggestions"}
        d["suggestions"] = [s.to_dict() for s in self.suggestions]
        d["total_bytes"] = self.total_bytes
        d["simulated"] = True
        return d

    def table(self) -> str:
        """The report ``--plan-memory`` prints."""
        g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
        who = "per GPU" if self.world_size == 1 else f"rank 0 of {self.world_size}, {self.strategy}"
        lines = [f"flowbp-train memory plan (simulated, {who}): {self.family} {self.resolution}px batch "
                 f"{self.batch}, {self.method}, {self.executor} executor; architecture: {self.source}",
                 f"  peak of live tensors  {g(self.peak_bytes)} GiB   set in: {self.peak_phase} ({self.peak_stage})"]
        for cat in CATEGORIES:
            if self.breakdown.get(cat):
                lines.append(f"    {cat:19s} {g(self.breakdown[cat])} GiB")
        lines.append("  stages (live peak)   " + ", ".join(f"{s} {b / GiB:.2f}" for s, b in self.stage_peaks.items()))
        top = sorted(self.phase_peaks.items(), key=lambda kv: -kv[1])[:5]
        lines.append("  highest phases       " + ", ".join(f"{p} {b / GiB:.2f}" for p, b in top))
        lines.append(f"  allocator replay      {g(self.allocated_bytes)} GiB allocated, {g(self.reserved_bytes)} GiB "
                     f"reserved (peak in: {self.reserved_phase})")
        lines.append("  fixed costs           " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.fixed.items()))
        lines.append(f"  total                 {g(self.total_bytes)} GiB   (reserved + fixed; host memory: "
                     f"{self.host_peak_bytes / GiB:.1f} GiB; simulated in {self.seconds:.0f} s)")
        if self.fits is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {self.gpu_memory_bytes / GiB:g} GiB GPU: {verdict} ({self.fit_detail})")
            if self.suggestions:
                good = [s for s in self.suggestions if s.fits]
                head = "changes that fit" if good else "no change the trainer offers fits this GPU"
                lines.append(f"  {head} (cheapest first; answered in {self.answer_seconds:.0f} s):")
                for s in self.suggestions:
                    if s.status in ("fits", "does not fit"):
                        what = f"{s.total_bytes / GiB:6.2f} GiB, {s.status} (simulated in {s.seconds:.0f} s)"
                    elif s.status == "skipped":
                        what = f"skipped, not simulated: {s.reason}"
                    else:
                        what = "not simulated: a cheaper change fits"
                    lines.append(f"    {s.command:48s} {what}  [{s.cost}: {s.why}]")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def prepare_config(cfg):
    """A validated copy of ``cfg`` ready to simulate: a null model path becomes the shipped architecture,
    the prompts are read (a file becomes its list)."""
    from flowbp_train.config import load_prompts, validate

    cfg = copy.deepcopy(cfg)
    if not cfg.pretrained_model_name_or_path:
        cfg.pretrained_model_name_or_path = PUBLISHED
    cfg = validate(cfg)
    cfg.prompts = list(load_prompts(cfg.prompts))
    return cfg


def _rank_prompts(cfg, world_size: int) -> tuple[list[str], int]:
    """The prompts to simulate with, and how many rank 0 of the real run holds: the first
    ``world_size * PROMPT_CHUNK`` of the run's, so that rank 0 encodes one full chunk (the most the
    trainer's setup encodes at once, so the device peak is the same); the host cache is scaled to the
    real count."""
    from flowbp_train.distributed import DistState, shard_prompts
    from flowbp_train.trainer import PROMPT_CHUNK

    prompts = list(cfg.prompts)
    real = len(shard_prompts(prompts, DistState(rank=0, world_size=world_size)))
    return prompts[: world_size * PROMPT_CHUNK], real


def _phase_of(sim: Simulation, event: int) -> str:
    tr = sim.trace
    if event < 0 or event >= len(tr.events):
        return ""
    return tr.phases.get(tr.events[event][1], "")


def check_world_size(world_size) -> int:
    """``world_size`` as an integer >= 1 (ValueError naming it otherwise)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
    return world_size


class _Measured:
    """One simulation, its plan and what the fit answer needs (the trace and the stages' peaks)."""

    def __init__(self, cfg, world_size: int, sim_kw: dict, forward_cache: dict | None):
        from flowbp_train.memory.simulate import simulate

        sim_cfg = copy.deepcopy(cfg)
        sim_cfg.prompts, real_prompts = _rank_prompts(cfg, world_size)
        sim = simulate(sim_cfg, world_size=world_size, forward_cache=forward_cache, **sim_kw)
        self.sim = sim
        tr = sim.trace
        rep = replay(tr.events)
        self.stage_events = sim.stage_peaks()
        peak_stage = sim.stage_of(tr.peak.event)
        notes = list(sim.notes)
        fixed = fixed_costs(sim.world_size)
        host = sim.host_peak + max(0, real_prompts + sim.negative_cached - sim.cached_prompts) * sim.prompt_bytes
        if sim.world_size > 1:
            notes.append(f"NCCL's own buffers are not simulated: counted as {NCCL_BYTES_PER_RANK / GiB:.2f} GiB per "
                         f"rank (allocator.NCCL_BYTES_PER_RANK); collectives ran on a fake process group")
        if sim.strategy == "fsdp2" and (sim.node_backwards > 1 or cfg.gradient_accumulation_steps > 1):
            notes.append(f"FSDP2: {sim.node_backwards} node backwards x {cfg.gradient_accumulation_steps} "
                         f"micro-batches; all but the last run with gradient synchronisation off, so each rank "
                         f"holds the unsharded gradients until the last one reduce-scatters them")
        notes.append("not seen by a simulation: fragmentation beyond the allocator model, kernel-internal buffers "
                     "(flash-attention backward, cuDNN algorithm choice up to ~1 GiB)")
        self.plan = MemoryPlan(
            family=cfg.family, resolution=cfg.resolution, batch=cfg.train_batch_size, method=cfg.method,
            executor=cfg.executor, world_size=sim.world_size, strategy=sim.strategy, peak_bytes=tr.peak.bytes,
            peak_phase=tr.peak.phase, peak_stage=peak_stage, breakdown=tr.breakdown(),
            stage_peaks={s: b for s, (b, _e) in self.stage_events.items()}, phase_peaks=dict(tr.phase_peaks),
            allocated_bytes=rep.peak_allocated, reserved_bytes=rep.peak_reserved,
            reserved_phase=_phase_of(sim, rep.peak_reserved_event), fixed=fixed, host_peak_bytes=host,
            weights=sim.weights, seconds=sim.seconds, source=sim.source, node_backwards=sim.node_backwards,
            notes=notes)

    def fit(self, limit: int) -> tuple[bool, str]:
        """Whether the run fits a GPU of ``limit`` bytes, and why."""
        p = self.plan
        fixed = sum(p.fixed.values())
        avail = limit - fixed
        if p.total_bytes <= limit:
            return True, f"reserved {p.reserved_bytes / GiB:.2f} + fixed {fixed / GiB:.2f} GiB"
        if p.peak_bytes > avail:
            return False, (f"the live tensors alone reach {p.peak_bytes / GiB:.2f} GiB in {p.peak_phase} "
                           f"({p.peak_stage}); {avail / GiB:.2f} GiB left after the fixed costs")
        rep = replay(self.sim.trace.events, limit=avail)
        if rep.oom_at is None:
            return True, (f"the allocator replay limited to {avail / GiB:.2f} GiB releases its cache and never "
                          f"runs out")
        return False, (f"the allocator replay limited to {avail / GiB:.2f} GiB runs out in "
                       f"{_phase_of(self.sim, rep.oom_at)} ({self.sim.stage_of(rep.oom_at)})")

    def lower_bound(self, savings: list[Callable]) -> tuple[int, str]:
        """The least live bytes the run can need after changes whose ``saving`` functions are given: at each
        stage's peak, the live bytes less the most each change could remove there."""
        best, where = 0, ""
        for stage, (live, event) in self.stage_events.items():
            bd = self.sim.trace.breakdown(event)
            need = live - sum(min(f(stage, bd, self.plan), live) for f in savings)
            if need > best:
                best, where = need, f"the {stage} peak ({_phase_of(self.sim, event)})"
        return best, where


@dataclass(frozen=True)
class _StepSaving:
    """A change that only alters the training step can remove at most these categories' bytes there."""

    cats: tuple[str, ...]

    def __call__(self, stage: str, bd: dict[str, int], plan: MemoryPlan) -> int:
        return sum(bd.get(c, 0) for c in self.cats) if stage in _STEP else 0


_step_saving = _StepSaving


def _reward_saving(stage, bd, plan) -> int:
    # bf16 halves the tower's weights (resident from the setup on) and its activations
    half = plan.weights.get("reward (frozen)", 0) // 2
    return half + (sum(bd.get(c, 0) for c in _TRANSIENT) if stage in _STEP else 0)


def _offload_saving(stage, bd, plan) -> int:
    return bd.get("text encoders", 0) + bd.get("temporaries", 0) if stage != "setup" else 0


def candidates(cfg, world_size: int = 1) -> list[Suggestion]:
    """Real trainer options that lower memory, cheapest first (exact, then slower, then lossy)."""
    out = []
    if cfg.executor == "retain":
        out.append(Suggestion({"executor": "streaming"}, "exact", "one model graph at a time, same gradient",
                              saving=_step_saving(_TRANSIENT)))
    if not cfg.gradient_checkpointing:
        out.append(Suggestion({"gradient_checkpointing": True}, "exact", "recompute activations in backward",
                              saving=_step_saving(("activations", "temporaries"))))
    if cfg.train_batch_size > 1 and not cfg.vae_slicing:
        out.append(Suggestion({"vae_slicing": True}, "exact", "decode the batch one image at a time",
                              saving=_step_saving(_TRANSIENT)))
    if not cfg.offload_text_encoders:
        out.append(Suggestion({"offload_text_encoders": True}, "exact", "text encoders back to the CPU once the "
                              "prompts are encoded", saving=_offload_saving))
    if world_size > 1 and cfg.distributed_strategy != "fsdp2":
        out.append(Suggestion({"distributed_strategy": "fsdp2"}, "exact", "shard weights, gradients and optimizer "
                              "state over the ranks"))
    b, acc = cfg.train_batch_size, cfg.gradient_accumulation_steps
    while b > 1 and b % 2 == 0:
        b //= 2
        acc *= 2
        out.append(Suggestion({"train_batch_size": b, "gradient_accumulation_steps": acc}, "slower",
                              "same effective batch in more micro-batches",
                              saving=_step_saving((*_TRANSIENT, "rollout cache"))))
    if cfg.velocity_cache != "fp8":
        out.append(Suggestion({"velocity_cache": "fp8"}, "lossy", "e4m3 velocity cache, error bound 2^-4",
                              saving=_step_saving(("rollout cache",))))
    if cfg.reward != "mini" and cfg.reward_kwargs.get("dtype", "fp32") in ("fp32", "float32"):
        out.append(Suggestion({"reward_kwargs.dtype": "bf16"}, "lossy", "reward tower in bf16",
                              saving=_reward_saving))
    if cfg.mixed_precision == "no":
        out.append(Suggestion({"mixed_precision": "bf16"}, "lossy", "model weights and compute in bf16"))
    return out


def _apply(cfg, overrides: dict):
    cfg = copy.deepcopy(cfg)
    for k, v in overrides.items():
        top, _, sub = k.partition(".")
        if sub:
            getattr(cfg, top)[sub] = v
        else:
            setattr(cfg, top, v)
    return prepare_config(cfg)


def _same_transformer(a, b) -> bool:
    """Whether two configs build the same transformer (so no-grad forwards can be replayed across them)."""
    keys = ("family", "pretrained_model_name_or_path", "mixed_precision", "rank", "lora_target_modules",
            "resolution", "max_sequence_length", "distributed_strategy")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def plan_memory(cfg, *, gpu_memory: float | None = None, world_size: int = 1, max_suggestions: int = 1,
                progress: bool = False, **sim_kw) -> MemoryPlan:
    """Simulate one run of ``cfg`` (a ``TrainConfig``) at full size and report its memory per GPU.

    Args:
        cfg: the run's config, as ``load_config`` resolves it (``pretrained_model_name_or_path`` may be a
            local model folder, whose ``config.json`` files are used, or null / a model id: the shipped
            published architecture of the family is used).
        gpu_memory: the GPU's memory in GiB; the plan then says whether the run fits and, when not,
            simulates the cheapest real changes, in order, until ``max_suggestions`` of them fit (changes
            that cannot fit, by the bound in the module docstring, are skipped and say why).
        world_size: ranks of a data-parallel run (``torchrun --nproc_per_node``); the figures are rank 0's
            with ``cfg.distributed_strategy`` (``ddp``: a full replica plus gradient buckets; ``fsdp2``:
            1/N shards plus the gathered blocks and reduce-scatter buffers; NCCL buffers as a constant).
        progress: print a line per simulation.
        sim_kw: passed to ``simulate`` (``fake``, ``reward_factory``, ``memoize``; tests).
    """
    import time

    if gpu_memory is not None and (isinstance(gpu_memory, bool) or not isinstance(gpu_memory, (int, float))
                                   or not gpu_memory > 0):
        raise ValueError(f"gpu_memory: expected a number of GiB > 0, got {gpu_memory!r}")
    check_world_size(world_size)
    if isinstance(max_suggestions, bool) or not isinstance(max_suggestions, int) or max_suggestions < 1:
        raise ValueError(f"max_suggestions: expected an integer >= 1, got {max_suggestions!r}")
    t0 = time.perf_counter()
    cfg = prepare_config(cfg)
    cache: dict = {}
    base = _Measured(cfg, world_size, sim_kw, cache)
    plan = base.plan
    if progress:
        print(f"  simulated {cfg.family} {cfg.resolution}px: {plan.total_bytes / GiB:.2f} GiB ({plan.seconds:.0f} s)",
              flush=True)
    if gpu_memory is None:
        return plan
    limit = int(gpu_memory * GiB)
    plan.gpu_memory_bytes = limit
    plan.fits, plan.fit_detail = base.fit(limit)
    if plan.fits:
        plan.answer_seconds = time.perf_counter() - t0
        return plan
    fixed = sum(plan.fixed.values())

    def measure(s: Suggestion, overrides: dict) -> None:
        c = _apply(cfg, overrides)
        m = _Measured(c, world_size, sim_kw, cache if _same_transformer(c, cfg) else None)
        s.fits, _ = m.fit(limit)
        s.total_bytes, s.seconds = m.plan.total_bytes, m.plan.seconds
        s.status = "fits" if s.fits else "does not fit"
        if progress:
            print(f"  simulated {s.command}: {s.total_bytes / GiB:.2f} GiB, {s.status} ({s.seconds:.0f} s)", flush=True)

    tried = candidates(cfg, world_size)
    fitting = 0
    for s in tried:
        if fitting >= max_suggestions:
            break  # the rest stay "not tried": a cheaper change fits
        if s.saving is not None:
            need, where = base.lower_bound([s.saving])
            if need + fixed > limit:
                s.status = "skipped"
                s.reason = (f"even with all it can save, {where} needs {(need + fixed) / GiB:.2f} GiB "
                            f"(fixed costs included)")
                continue
        measure(s, s.overrides)
        fitting += s.fits
    if not fitting and tried:  # no single change is enough: accumulate them, cheapest first
        combo: dict = {}
        savings: list[Callable | None] = []
        last = None
        for s in list(tried):
            combo.update(s.overrides)
            savings.append(s.saving)
            last = Suggestion(dict(combo), "combined", "the changes above together")
            if None not in savings:
                need, where = base.lower_bound(savings)
                if need + fixed > limit:  # cannot fit yet: add the next change before simulating
                    last.status = "skipped"
                    last.reason = f"even with all they can save, {where} needs {(need + fixed) / GiB:.2f} GiB"
                    continue
            measure(last, combo)
            tried.append(last)
            if last.fits:
                break
        if last is not None and last.status == "skipped":
            tried.append(last)  # all of them together: why it was not even simulated
    plan.suggestions = tried
    plan.answer_seconds = time.perf_counter() - t0
    return plan


__all__ = ["MemoryPlan", "STAGES", "Suggestion", "candidates", "plan_memory", "prepare_config"]
