"""``plan_memory``: the peak GPU memory of a training config, where it is set, and what would make it fit.

One simulated training step and sample step (``simulate.py``) give the live bytes (the peak, its phase,
bytes by category); the allocation trace replayed through the caching-allocator model (``allocator.py``)
gives what the allocator would hold (allocated, reserved); the fixed costs outside it are added to
decide fit against ``gpu_memory``. When it does not fit, candidate changes (real trainer options only,
cheapest first: exact ones, then same result slower, then lossy) are each simulated again; the plan
names those that fit. All figures are simulated, not measured.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from flowbp_train.memory.allocator import GiB, fixed_costs, replay
from flowbp_train.memory.tracker import CATEGORIES, Trace

#: Placeholder model path for validation when a recipe leaves it null: the shipped architecture is used.
PUBLISHED = "<published architecture>"


@dataclass
class Suggestion:
    """A change of config keys, why it costs little, and its simulated total (bytes)."""

    overrides: dict
    cost: str  # "exact", "slower" or "lossy"
    why: str
    total_bytes: int = 0
    fits: bool = False

    @property
    def command(self) -> str:
        return " ".join(f"{k}={_yaml(v)}" for k, v in self.overrides.items())


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


@dataclass
class MemoryPlan:
    """The simulated memory of one training step (and one sample step) of a config, per GPU.

    Attributes:
        peak_bytes / peak_phase: high-water mark of the live tensor bytes and the phase that sets it.
        breakdown: bytes by category at that peak (``tracker.CATEGORIES``).
        phase_peaks: the highest live bytes of each phase of the training step.
        allocated_bytes / reserved_bytes: the caching-allocator replay's peaks (training step).
        sample_peak_bytes / sample_reserved_bytes: the same for the sample step.
        fixed: memory outside the allocator (CUDA context, workspaces, NCCL), by name.
        total_bytes: ``max(reserved, sample reserved) + sum(fixed)``, what ``gpu_memory`` is compared with.
        host_peak_bytes: host (CPU) memory of what the trainer keeps there (text encoders, prompt cache).
        fits: None without ``gpu_memory``; suggestions: simulated changes (when it does not fit).
    """

    family: str
    resolution: int
    batch: int
    method: str
    executor: str
    peak_bytes: int
    peak_phase: str
    breakdown: dict[str, int]
    phase_peaks: dict[str, int]
    allocated_bytes: int
    reserved_bytes: int
    reserved_phase: str
    sample_peak_bytes: int
    sample_reserved_bytes: int
    fixed: dict[str, int]
    host_peak_bytes: int
    weights: dict[str, int]
    seconds: float
    source: str
    gpu_memory_bytes: int | None = None
    fits: bool | None = None
    suggestions: list[Suggestion] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return max(self.reserved_bytes, self.sample_reserved_bytes) + sum(self.fixed.values())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes"] = self.total_bytes
        d["simulated"] = True
        return d

    def table(self) -> str:
        """The report ``--plan-memory`` prints."""
        g = lambda b: f"{b / GiB:7.2f}"  # noqa: E731
        lines = [f"flowbp-train memory plan (simulated, per GPU): {self.family} {self.resolution}px batch "
                 f"{self.batch}, {self.method}, {self.executor} executor; architecture: {self.source}",
                 f"  peak of live tensors  {g(self.peak_bytes)} GiB   set in: {self.peak_phase}"]
        for cat in CATEGORIES:
            if self.breakdown.get(cat):
                lines.append(f"    {cat:19s} {g(self.breakdown[cat])} GiB")
        top = sorted(self.phase_peaks.items(), key=lambda kv: -kv[1])[:5]
        lines.append("  highest phases       " + ", ".join(f"{p} {b / GiB:.2f}" for p, b in top))
        lines.append(f"  allocator replay      {g(self.allocated_bytes)} GiB allocated, {g(self.reserved_bytes)} GiB "
                     f"reserved (peak in: {self.reserved_phase})")
        lines.append(f"  sample step           {g(self.sample_peak_bytes)} GiB live, {g(self.sample_reserved_bytes)} "
                     f"GiB reserved")
        lines.append("  fixed costs           " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.fixed.items()))
        lines.append(f"  total                 {g(self.total_bytes)} GiB   (host memory: "
                     f"{self.host_peak_bytes / GiB:.1f} GiB; simulated in {self.seconds:.0f} s)")
        if self.fits is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {self.gpu_memory_bytes / GiB:g} GiB GPU: {verdict}")
            if not self.fits:
                good = [s for s in self.suggestions if s.fits]
                if good:
                    lines.append("  changes that fit (each simulated):")
                    for s in good:
                        lines.append(f"    {s.command:55s} {s.total_bytes / GiB:6.2f} GiB  ({s.cost}: {s.why})")
                else:
                    lines.append("  no change the trainer offers fits this GPU (simulated: "
                                 + ", ".join(f"{s.command} {s.total_bytes / GiB:.1f}" for s in self.suggestions) + ")")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def prepare_config(cfg):
    """A copy of ``cfg`` ready to simulate: a null model path becomes the shipped architecture."""
    from flowbp_train.config import validate

    cfg = copy.deepcopy(cfg)
    if not cfg.pretrained_model_name_or_path:
        cfg.pretrained_model_name_or_path = PUBLISHED
    return validate(cfg)


def _phase_of(trace: Trace, event: int) -> str:
    if event < 0 or event >= len(trace.events):
        return ""
    return trace.phases.get(trace.events[event][1], "")


def _measure(cfg, *, world_size: int = 1, sample: bool = True, **sim_kw) -> MemoryPlan:
    from flowbp_train.memory.simulate import simulate

    sim = simulate(cfg, sample=sample, **sim_kw)
    tr, st = sim.train, sim.sample
    rep = replay(tr.events)
    srep = replay(st.events) if st is not None else None
    notes = list(sim.notes)
    notes.append("not seen by a simulation: fragmentation beyond the allocator model, kernel-internal buffers "
                 "(flash-attention backward, cuDNN algorithm choice up to ~1 GiB); text encoders run on the host")
    return MemoryPlan(
        family=cfg.family, resolution=cfg.resolution, batch=cfg.train_batch_size, method=cfg.method,
        executor=cfg.executor, peak_bytes=tr.peak.bytes, peak_phase=tr.peak.phase, breakdown=tr.breakdown(),
        phase_peaks=dict(tr.phase_peaks), allocated_bytes=rep.peak_allocated, reserved_bytes=rep.peak_reserved,
        reserved_phase=_phase_of(tr, rep.peak_reserved_event),
        sample_peak_bytes=st.peak.bytes if st is not None else 0,
        sample_reserved_bytes=srep.peak_reserved if srep is not None else 0,
        fixed=fixed_costs(world_size), host_peak_bytes=sim.host_peak, weights=sim.weights, seconds=sim.seconds,
        source=sim.source, notes=notes)


def candidates(cfg) -> list[Suggestion]:
    """Real trainer options that lower memory, cheapest first (exact, then slower, then lossy)."""
    out = []
    if cfg.executor == "retain":
        out.append(Suggestion({"executor": "streaming"}, "exact", "one model graph at a time, same gradient"))
    if not cfg.gradient_checkpointing:
        out.append(Suggestion({"gradient_checkpointing": True}, "exact", "recompute activations in backward"))
    if cfg.train_batch_size > 1 and not cfg.vae_slicing:
        out.append(Suggestion({"vae_slicing": True}, "exact", "decode the batch one image at a time"))
    b, acc = cfg.train_batch_size, cfg.gradient_accumulation_steps
    while b > 1 and b % 2 == 0:
        b //= 2
        acc *= 2
        out.append(Suggestion({"train_batch_size": b, "gradient_accumulation_steps": acc}, "slower",
                              "same effective batch in more micro-batches"))
    if cfg.velocity_cache != "fp8":
        out.append(Suggestion({"velocity_cache": "fp8"}, "lossy", "e4m3 velocity cache, error bound 2^-4"))
    if cfg.reward != "mini" and cfg.reward_kwargs.get("dtype", "fp32") in ("fp32", "float32"):
        out.append(Suggestion({"reward_kwargs.dtype": "bf16"}, "lossy", "reward tower in bf16"))
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


def plan_memory(cfg, *, gpu_memory: float | None = None, world_size: int = 1, max_suggestions: int = 3,
                progress: bool = False, **sim_kw) -> MemoryPlan:
    """Simulate one training step of ``cfg`` (a ``TrainConfig``) at full size and report its memory.

    Args:
        cfg: the run's config, as ``load_config`` resolves it (``pretrained_model_name_or_path`` may be a
            local model folder, whose ``config.json`` files are used, or null / a model id: the shipped
            published architecture of the family is used).
        gpu_memory: the GPU's memory in GiB; the plan then says whether the run fits and, when not,
            simulates the cheapest real changes and lists up to ``max_suggestions`` that fit.
        world_size: ranks of a data-parallel run (adds the NCCL buffers per rank).
        progress: print a line per simulation.
        sim_kw: passed to ``simulate`` (``fake``, ``reward_factory``, ``memoize``; tests).
    """
    if gpu_memory is not None and not (isinstance(gpu_memory, (int, float)) and gpu_memory > 0):
        raise ValueError(f"gpu_memory: expected a number of GiB > 0, got {gpu_memory!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected an integer >= 1, got {world_size!r}")
    if world_size > 1:
        raise NotImplementedError("world_size: per-rank planning of multi-GPU runs is not implemented yet; "
                                  "plan one GPU (world_size=1)")
    cfg = prepare_config(cfg)
    plan = _measure(cfg, world_size=world_size, **sim_kw)
    if progress:
        print(f"  simulated {cfg.family} {cfg.resolution}px: {plan.total_bytes / GiB:.2f} GiB ({plan.seconds:.0f} s)")
    if gpu_memory is None:
        return plan
    limit = int(gpu_memory * GiB)
    plan.gpu_memory_bytes, plan.fits = limit, plan.total_bytes <= limit
    if plan.fits:
        return plan
    tried, fitting = [], 0
    for s in candidates(cfg):
        p = _measure(_apply(cfg, s.overrides), world_size=world_size, **sim_kw)
        s.total_bytes, s.fits = p.total_bytes, p.total_bytes <= limit
        if progress:
            print(f"  simulated {s.command}: {s.total_bytes / GiB:.2f} GiB")
        tried.append(s)
        fitting += s.fits
        if fitting >= max_suggestions:
            break
    if not fitting and tried:  # no single change is enough: accumulate them, cheapest first
        combo: dict = {}
        for s in tried:
            if "train_batch_size" in s.overrides and "train_batch_size" in combo:
                combo.update(s.overrides)
                continue
            combo.update(s.overrides)
            p = _measure(_apply(cfg, combo), world_size=world_size, **sim_kw)
            c = Suggestion(dict(combo), "combined", "the changes above together", p.total_bytes, p.total_bytes <= limit)
            if progress:
                print(f"  simulated {c.command}: {c.total_bytes / GiB:.2f} GiB")
            if c.fits:
                tried.append(c)
                break
    plan.suggestions = tried
    return plan
