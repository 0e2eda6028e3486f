"""Run one real ``Trainer.training_step`` (and one sample step) of a config with every weight a fake tensor.

The trainer is built inside ``FakeTensorMode`` from configs only (``build.py``), on the CPU device, and
its step runs *outside* the mode: parameters, activations and gradients are fake (shapes and dtypes, no
storage, no compute), while what the program computes from scratch (sigma schedules, the index sampler's
plans, step sizes, timesteps, noise) stays real, so every step size and active set is the true one.
:class:`~flowbp_train.memory.tracker.MemoryTracker` accounts every byte as the GPU would hold it, in one
trace from the first weight to the end of the sample step: loading (modules built in host memory, then
placed, as a run does), the trainer's setup (its prompts encoded with the text encoders placed on the
device by the adapter, then offloaded), a first optimizer step, the measured training step, the sample
step. What only a planning run needs is confined here, applied only while planning: conversions that
change nothing return early and real ones go through ``.data`` (``Module.to`` cannot swap fake
parameters); scalar reads of fakes answer neutral values (finite, 1.0); AdamW and clipping take their GPU
defaults (``foreach``); phases are named by hooks; one AdamW warm-up step with zero gradients gives the
steady state; no-grad transformer forwards of identical shapes are simulated once and replayed (a
forward without grad keeps nothing, so its allocation sequence depends only on the shapes; a replayed
call frees nothing older than itself but its arguments, so a few small library caches may differ from a
full run: none on the tiny test models, tested). With ``world_size`` > 1 the trainer joins a fake
process group of that size as rank 0 (collectives are no-ops, shapes are true) and wraps its transformer
as the config says (DDP or FSDP2): FSDP2's gathered blocks, its reduce-scatter buffers and DDP's
gradient buckets are then the library's own, allocated as fakes and tracked like everything else
(against two real gloo ranks: equal to a few blocks, tested).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch
from torch.utils._pytree import tree_leaves

from flowbp_train.memory.tracker import MemoryTracker, Trace

#: Stages of the trace, in program order: loading and the trainer's setup (prompt encoding included, a
#: first optimizer step), the measured training step, the sample step.
STAGES = ("setup", "training step", "sample step")


@dataclass
class Simulation:
    """The trace of one simulated run (setup, training step, sample step), with what the report needs.

    ``stages``: stage -> the index of its first event in ``trace.events`` (see ``STAGES``);
    ``weights``: bytes of frozen / trainable weights by module (this rank's shards under FSDP2);
    ``node_backwards``: backward passes through the transformer in the step (the executor's active nodes
    times the micro-batches); ``strategy``, ``world_size``: how the transformer was wrapped.
    """

    trace: Trace
    stages: dict[str, int] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=dict)
    host_peak: int = 0
    seconds: float = 0.0
    source: str = ""
    notes: list[str] = field(default_factory=list)
    world_size: int = 1
    strategy: str = "none"
    node_backwards: int = 0
    forward_replays: int = 0
    cached_prompts: int = 0  # prompts in the adapter's host cache (the empty negative one included)
    negative_cached: bool = False  # the empty negative prompt (two-branch CFG) is among them
    prompt_bytes: int = 0  # host bytes of one cached prompt's embeddings

    def stage_of(self, event: int) -> str:
        name = STAGES[0]
        for st, first in self.stages.items():
            if event >= first:
                name = st
        return name

    def stage_peaks(self) -> dict[str, tuple[int, int]]:
        """``stage -> (highest live device bytes, the event index where it is reached)``."""
        out: dict[str, tuple[int, int]] = {}
        live, cur = 0, None
        bounds = sorted((first, st) for st, first in self.stages.items())
        b = 0
        for n, (kind, _aid, size) in enumerate(self.trace.events):
            while b < len(bounds) and n >= bounds[b][0]:
                cur = bounds[b][1]
                out.setdefault(cur, (live, n - 1))
                b += 1
            live += size if kind == 0 else -size
            if cur is not None and live > out[cur][0]:
                out[cur] = (live, n)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


# ------------------------------------------------------------------------------- planning-only patches
_ORIG_TO = torch.nn.Module.to


def _module_to(self, *args, **kwargs):
    """``Module.to`` that returns early when nothing changes and converts fake parameters through
    ``.data`` (the swap path ``_apply`` takes for fake tensors cannot swap a parameter with itself)."""
    device, dtype, _nb, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    tensors = [*self.parameters(), *self.buffers()]

    def same(t):
        return (device is None or t.device == device) and (dtype is None or not t.is_floating_point()
                                                           or t.dtype == dtype)

    if all(same(t) for t in tensors):
        return self
    if not any(_is_fake(t) for t in tensors):
        return _ORIG_TO(self, *args, **kwargs)
    for m in self.modules():
        for p in m._parameters.values():
            if p is not None and not same(p):
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else None)
        for k, b in m._buffers.items():
            if b is not None and not same(b):
                m._buffers[k] = b.to(device=device, dtype=dtype if b.is_floating_point() else None)
    return self


@contextlib.contextmanager
def planning_patches() -> Iterator[None]:
    with mock.patch.object(torch.nn.Module, "to", _module_to):
        yield


def _grad_tensors(params) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _state_tensors(optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


# ------------------------------------------------------------------------------- phases
class _Phases:
    """Names the phase of the program from wrappers and autograd hooks (backward phases start when the
    gradient of the tensor that opens them arrives) and sees the text encoders come and go."""

    def __init__(self, tracker: MemoryTracker):
        self.tr = tracker
        self.node_backwards = 0

    def set(self, name: str) -> None:
        self.tr.phase = name

    def hook(self, t, name: str) -> None:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, n=name: self.set(n))

    def _encoding(self) -> None:
        if not self.tr.phase.startswith("sample"):
            self.set("encode")

    def install_prompts(self, adapter) -> contextlib.ExitStack:
        """Before the trainer is built (its setup encodes the prompts): the adapter parks the transformer
        and the VAE in host memory (``park_on_host``), places each text encoder on the device to encode
        (``place_text_encoder``: its weights leave host memory), offloads them (``offload_text_encoders``:
        back to the host), empties the allocator's cache (``release_cached_device_memory``) and brings the
        model back (``unpark``)."""
        from flowbp_train.models import base

        tr, stack = self.tr, contextlib.ExitStack()
        orig_place = base.place_text_encoder

        def place(module, device, dtype):
            self._encoding()
            out = orig_place(module, device, dtype)
            tr.move_to_device([*module.parameters(), *module.buffers()])
            return out

        stack.enter_context(mock.patch.object(base, "place_text_encoder", place))
        orig_offload = adapter.offload_text_encoders

        def offload():
            orig_offload()
            tr.move_to_host([t for m in adapter.text_encoders() for t in (*m.parameters(), *m.buffers())])

        stack.enter_context(mock.patch.object(adapter, "offload_text_encoders", offload))

        def model_tensors():
            return [t for m in adapter.placed_modules() for t in (*m.parameters(), *m.buffers())]

        orig_park, orig_unpark = adapter.park_on_host, adapter.unpark

        def park():  # encode_all: the transformer and the VAE wait in host memory while prompts are encoded
            orig_park()
            tr.move_to_host(model_tensors())

        def unpark():  # and come back once the encoders are offloaded: the model's load, again
            orig_unpark()
            self.set("load weights")
            tr.move_to_device(model_tensors())

        stack.enter_context(mock.patch.object(adapter, "park_on_host", park))
        stack.enter_context(mock.patch.object(adapter, "unpark", unpark))
        stack.enter_context(mock.patch.object(base, "release_cached_device_memory", lambda device: tr.release_cached()))
        if hasattr(adapter, "_encode"):  # what _encode_cached calls for the prompts not encoded yet
            orig_encode = adapter._encode

            def encode(prompts):
                self._encoding()
                return orig_encode(prompts)

            stack.enter_context(mock.patch.object(adapter, "_encode", encode))
        return stack

    def install(self, trainer, trainer_module) -> contextlib.ExitStack:
        ad, stack = trainer.adapter, contextlib.ExitStack()
        orig_decode, orig_vel, orig_prompts = ad.decode, ad.velocity_fn, ad.encode_prompts
        score = trainer.reward.score

        def decode(latents):
            self.hook(latents, "surrogate backward")
            self.set("decode" if torch.is_grad_enabled() and latents.requires_grad else self.tr.phase)
            return orig_decode(latents)

        def reward_score(images, prompts):
            self.hook(images, "decode backward")
            self.set("reward forward" if torch.is_grad_enabled() and images.requires_grad else self.tr.phase)
            out = score(images, prompts)
            self.hook(out, "reward backward")
            return out

        def velocity_fn(batch, sigmas, **kw):
            v_fn = orig_vel(batch, sigmas, **kw)

            def velocity(x, i):
                if torch.is_grad_enabled():
                    self.set(f"node {i} forward")
                    v = v_fn(x, i)
                    if isinstance(v, torch.Tensor) and v.requires_grad:
                        self.node_backwards += 1
                    self.hook(v, f"node {i} backward")
                    return v
                return v_fn(x, i)

            return velocity

        def encode_prompts(prompts):
            if not self.tr.phase.startswith("sample"):
                self.set("step start")
            return orig_prompts(prompts)

        orig_rollout = trainer_module.rollout

        def rollout(*a, **kw):
            self.set("rollout")
            ro = orig_rollout(*a, **kw)
            c = ro.cache
            self.tr.tag([*c._latents, *c._vdata, *(s for s in c._vscale if s is not None)], "rollout cache")
            self.set("surrogate")
            return ro

        orig_clip = torch.nn.utils.clip_grad_norm_

        def clip(*a, **kw):
            self.set("clip")
            kw.setdefault("foreach", True)  # the GPU default
            return orig_clip(*a, **kw)

        for obj, name, new in ((ad, "decode", decode), (ad, "velocity_fn", velocity_fn),
                               (ad, "encode_prompts", encode_prompts), (trainer.reward, "score", reward_score)):
            stack.enter_context(mock.patch.object(obj, name, new))
        stack.enter_context(mock.patch.object(trainer_module, "rollout", rollout))
        stack.enter_context(mock.patch.object(torch.nn.utils, "clip_grad_norm_", clip))
        h1 = trainer.optimizer.register_step_pre_hook(lambda *_: self.set("optimizer step"))
        stack.callback(h1.remove)
        if trainer.ema is not None:
            orig_update = trainer.ema.update

            def ema_update():
                self.set("EMA")
                return orig_update()

            stack.enter_context(mock.patch.object(trainer.ema, "update", ema_update))
        return stack


# ------------------------------------------------------------------------------- many ranks
@contextlib.contextmanager
def process_group(world_size: int) -> Iterator[None]:
    """Rank 0 of ``world_size`` ranks for the trainer: a process group already joined (a real run under
    torchrun, the tests' reference) is used as it is; otherwise a fake one (torch's own ``fake`` backend:
    every collective returns at once, leaving its buffers as they are), with the launcher's environment."""
    import torch.distributed as dist

    if world_size == 1:
        yield
        return
    if dist.is_initialized():
        if dist.get_world_size() != world_size:
            raise ValueError(f"world_size: {world_size} requested inside a process group of {dist.get_world_size()}")
        yield
        return
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError:  # pragma: no cover - the module ships with torch's wheels
        raise RuntimeError("world_size: planning more than one rank needs torch's fake process group "
                           "(torch.testing._internal.distributed.fake_pg), missing from this torch") from None
    from flowbp_train import distributed as D

    alone = D.DistState()
    orig_raise = D.raise_if_any
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        # the other ranks do not exist: nothing to agree on (their flags would be fakes read as 1)
        with mock.patch.dict(os.environ, {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0",
                                          "LOCAL_WORLD_SIZE": str(world_size)}), \
                mock.patch.object(D, "raise_if_any", lambda err, exc, _state: orig_raise(err, exc, alone)), \
                mock.patch.object(D, "all_ranks_ok", lambda ok, _state: ok):
            yield
    finally:
        dist.destroy_process_group()


def _broadcast_like(process_group, module_states, bucket_size: int, src: int) -> None:
    """What DDP's start-up broadcast of the weights allocates, without reading them: one flat copy of
    each coalesced chunk (``_take_tensors``: same dtype, up to ``bucket_size`` bytes), freed after it."""
    for chunk in torch._utils._take_tensors(module_states, bucket_size):
        flat = torch.empty(sum(t.numel() for t in chunk), dtype=chunk[0].dtype, device=chunk[0].device)
        del flat


def _unsharded_grads(group) -> list[torch.Tensor]:
    out = []
    for fp in group.fsdp_params:
        up = getattr(fp, "_unsharded_param", None)
        out += [t for t in (getattr(up, "grad", None), fp.unsharded_accumulated_grad) if t is not None]
    return out


def distributed_regions(tracker: MemoryTracker, *, fake: bool) -> contextlib.ExitStack:
    """Name what the data-parallel wrappers allocate for themselves: FSDP2's hooks (gathered weights in
    its pre-forward and pre-backward, reduce-scatter buffers after a block's backward, the unsharded
    gradients it accumulates while synchronisation is off) and DDP's construction (its gradient buckets).
    In a fake run, the buffers they create from nothing are fake as well (``MemoryTracker.in_region``)."""
    from flowbp_train import distributed as D

    stack = contextlib.ExitStack()

    def wrap(cls, name: str, kind: str, grads: bool = False) -> None:
        orig = getattr(cls, name)

        def run(self_, *a, **kw):
            if grads:
                tracker.tag(_unsharded_grads(self_), "gradients")
            with tracker.in_region(kind, fake_factories=fake):
                out = orig(self_, *a, **kw)
            if grads:
                tracker.tag(_unsharded_grads(self_), "gradients")
            return out

        stack.enter_context(mock.patch.object(cls, name, run))

    try:
        from torch.distributed.fsdp._fully_shard import _fully_shard
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPState = None
    if FSDPState is not None:
        for name in ("_pre_forward", "_post_forward", "_pre_backward"):
            wrap(FSDPState, name, "gathered weights")
        wrap(FSDPState, "_root_post_backward_final_callback", "reduce buffers")
        wrap(FSDPParamGroup, "post_backward", "reduce buffers", grads=True)
        orig_mesh = _fully_shard._init_default_mesh

        def default_mesh(*a, **kw):  # the mesh is a host-side table of ranks: real, not device memory
            with torch._subclasses.fake_tensor.unset_fake_temporarily(), tracker.on_host():
                return orig_mesh(*a, **kw)

        stack.enter_context(mock.patch.object(_fully_shard, "_init_default_mesh", default_mesh))
    orig_wrap = D.wrap_model

    def wrap_model(model, strategy, state):
        if strategy != "ddp":
            return orig_wrap(model, strategy, state)
        with contextlib.ExitStack() as inner:
            inner.enter_context(tracker.in_region("reduce buffers", fake_factories=fake))
            if fake:  # DDP's start-up check and broadcast read weight data (the fake ranks are identical)
                import torch.distributed.utils as dist_utils
                import torch.nn.parallel.distributed as ddp

                inner.enter_context(mock.patch.object(ddp, "_verify_param_shape_across_processes",
                                                      lambda *a, **k: None))
                inner.enter_context(mock.patch.object(dist_utils, "_sync_params_and_buffers", _broadcast_like))
            wrapped = orig_wrap(model, strategy, state)
        if fake:  # the fake group's all-reduce future holds no value; its buffer is reduced in place anyway
            from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

            wrapped.register_comm_hook(None, noop_hook)
        return wrapped

    stack.enter_context(mock.patch.object(D, "wrap_model", wrap_model))
    return stack


# ------------------------------------------------------------------------------- no-grad forward replay
class _ForwardMemo:
    """Simulate a no-grad transformer forward once per input signature; later calls replay its allocation
    events and return a fresh fake output of the recorded shape. ``memo`` may be shared between
    simulations of the same transformer (architecture, dtype, LoRA): the planner's candidate changes that
    leave it as it is replay the forwards the first simulation recorded."""

    def __init__(self, module: torch.nn.Module, tracker: MemoryTracker, fake_mode, memo: dict | None = None):
        self.module, self.tr, self.fake_mode = module, tracker, fake_mode
        self.orig = module.forward
        self.memo: dict = {} if memo is None else memo
        self.hits = 0

    @staticmethod
    def _sig(args, kwargs):
        def one(v):
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), v.stride(), v.dtype, v.requires_grad)
            if isinstance(v, (int, float, bool, str, type(None))):
                return ("V", type(v).__name__) if isinstance(v, float) else ("V", v)
            if isinstance(v, (tuple, list)):
                return tuple(one(x) for x in v)
            if isinstance(v, dict):
                return tuple((k, one(x)) for k, x in sorted(v.items()))
            return ("O", id(v))
        return one(tuple(args)), one(dict(kwargs))

    def _arg_tensors(self, args, kwargs) -> list[torch.Tensor]:
        return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.orig(*args, **kwargs)
        key = self._sig(args, kwargs)
        rec = self.memo.get(key)
        tensors = self._arg_tensors(args, kwargs)
        if rec is None:
            arg_ids = [a.aid if a is not None else None for a in map(self.tr._lookup, tensors)]
            with self.tr.recording() as events:
                out = self.orig(*args, **kwargs)
            if not (isinstance(out, tuple) and all(isinstance(o, torch.Tensor) for o in out)):
                return out
            outs = [self.tr._lookup(o) for o in out]
            kinds = {aid: self.tr.trace.kinds.get(aid, "temporaries") for kind, aid, _ in events if kind == 0}
            self.memo[key] = (events, kinds, [(tuple(o.shape), o.stride(), o.dtype) for o in out],
                              [a.aid if a is not None else None for a in outs], arg_ids)
            return out
        self.hits += 1
        events, kinds, metas, out_ids, arg_ids = rec
        del args, kwargs  # the caller's references only, as in the recorded call
        argmap = {aid: t for aid, t in zip(arg_ids, tensors) if aid is not None}
        del tensors
        with self.fake_mode:
            return self.tr.replay(events, out_ids, lambda: tuple(
                torch.empty_strided(s, st, dtype=d) for s, st, d in metas), argmap, kinds)


# ------------------------------------------------------------------------------- the run
def simulate(cfg, *, fake: bool = True, reward_factory: Callable | None = None, memoize: bool = True,
             sample: bool = True, spec: dict | None = None, world_size: int = 1,
             forward_cache: dict | None = None) -> Simulation:
    """Build the trainer of ``cfg`` (a validated ``TrainConfig``) and run one training step and, when
    ``sample``, one sample step, accounting every byte from the first weight on. ``fake=False`` runs the
    same program on real randomly initialised tensors (only for models small enough: the accounting's
    reference). ``world_size`` > 1: as rank 0 of that many ranks (``process_group``), the transformer
    wrapped by ``cfg.distributed_strategy``. ``forward_cache``: the no-grad forward replay's records, shared
    with other simulations of the same transformer (``_ForwardMemo``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from flowbp_train import trainer as trainer_module
    from flowbp_train.memory import build

    t0 = time.perf_counter()
    cfg = copy.deepcopy(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="flowbp-plan-")
    cfg.output_dir, cfg.report_to, cfg.progress_bar, cfg.device = tmp.name, "none", False, "cpu"
    tracker = MemoryTracker()
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    tracker.fake_mode = fake_mode if fake else None
    notes: list[str] = []
    stages: dict[str, int] = {"setup": 0}
    phases = _Phases(tracker)
    with contextlib.ExitStack() as stack:
        stack.callback(tmp.cleanup)
        stack.callback(lambda: _pass_on(caught, notes))  # after the catch below ends (last in, first out)
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("default")
        stack.enter_context(planning_patches())
        stack.enter_context(process_group(world_size))
        if world_size > 1:
            stack.enter_context(distributed_regions(tracker, fake=fake))
        # the tracker must be the innermost mode: FakeTensorMode answers ops without passing them down
        with fake_mode, tracker:
            tracker.phase = "load weights"
            # built on the host, then placed, as a run loads its modules on the CPU and moves them: the
            # reward first (Trainer._setup), then the transformer and the VAE (the adapter)
            with tracker.on_host():
                reward = reward_factory(cfg) if reward_factory is not None else build.build_reward(cfg)
            if isinstance(reward, torch.nn.Module):
                tracker.move_to_device([*reward.parameters(), *reward.buffers()])
            if cfg.family == "mini":
                adapter, spec = build.build_mini_adapter(cfg)
            else:
                adapter, spec = build.build_adapter(cfg, on_host=tracker.on_host, spec=spec,
                                                    to_device=tracker.move_to_device)
            tracker.tag([t for m in adapter.text_encoders() for t in (*m.parameters(), *m.buffers())],
                        "text encoders")
            with phases.install_prompts(adapter):  # the trainer's setup encodes the prompts (offload: on)
                tr = trainer_module.Trainer(cfg, adapter=adapter, reward=reward)
            tracker.phase = "first optimizer step"
            for g in tr.optimizer.param_groups:
                g["foreach"] = True  # torch's default on CUDA (one multi-tensor kernel per update)
            # steady state: one AdamW step with zero gradients allocates the moments
            for p in tr.params:
                p.grad = torch.zeros_like(p)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        steps = [s.get("step") for s in tr.optimizer.state.values()]
        tracker.move_to_host([s for s in steps if isinstance(s, torch.Tensor)])  # AdamW keeps steps on the CPU
        weights = _tag_weights(tracker, tr)
        tracker.tag(_state_tensors(tr.optimizer), "optimizer state")
        if tr.ema is not None:
            tracker.tag(tr.ema.shadow, "EMA")
        memo = None
        if memoize and fake:  # DDP and FSDP2 run their hooks around the forward: replayed too (tested)
            memo = _ForwardMemo(adapter.transformer, tracker, fake_mode, forward_cache)
            stack.enter_context(mock.patch.object(adapter.transformer, "forward", memo))
        # reference cycles are freed by the cyclic collector at unpredictable moments: collect now and hold
        # it during the measured steps, so the trace is the same on every run (cycles are freed at the end)
        gc.collect()
        gc.disable()
        stack.callback(gc.enable)
        with phases.install_prompts(adapter), phases.install(tr, trainer_module), tracker:
            stages["training step"] = len(tracker.trace.events)
            tr.training_step()
            tracker.tag(_grad_tensors(tr.params), "gradients")
            if sample:
                tracker.phase = "sample: prompts"
                gc.collect(0)  # the step's cycles: all in the youngest generation while gc is off
                stages["sample step"] = len(tracker.trace.events)
                _sample_step(tr, tracker)
        if memo is not None and memo.hits:
            notes.append(f"{memo.hits} no-grad transformer forwards of identical shapes replayed")
        cache = adapter.__dict__.get("_prompt_cache", {})
        per_prompt = max((sum(t.numel() * t.element_size() for t in e.values()) for e in cache.values()), default=0)
    return Simulation(tracker.trace, stages, weights, tracker.trace.host_peak, time.perf_counter() - t0,
                      spec.get("source", ""), notes, world_size=tr.world_size, strategy=tr.strategy,
                      node_backwards=phases.node_backwards, forward_replays=memo.hits if memo else 0,
                      cached_prompts=len(cache), negative_cached="" in cache, prompt_bytes=per_prompt)


def _pass_on(caught: list, notes: list[str]) -> None:
    """Warnings of the run: the data-parallel wrappers' (a real run would print them too) become notes of
    the plan, once each; the others are issued again as they were."""
    for w in caught:
        if f"torch{os.sep}distributed" in str(w.filename):
            text = " ".join(str(w.message).split())
            note = f"{type(w.message).__name__} from {Path(w.filename).parent.name}: {text[:160]}"
            if note not in notes:
                notes.append(note)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _tag_weights(tracker: MemoryTracker, tr) -> dict[str, int]:
    trainable = {id(p) for p in tr.params}
    mods = {"transformer": tr.adapter.transformer, "vae": getattr(tr.adapter, "vae", None), "reward": tr.reward}
    sizes = {}
    for name, m in mods.items():
        if not isinstance(m, torch.nn.Module):
            continue
        frozen = [t for t in (*m.parameters(), *m.buffers()) if id(t) not in trainable]
        tracker.tag(frozen, "frozen weights")
        sizes[f"{name} (frozen)"] = tracker.bytes_of(frozen)
    tracker.tag(tr.params, "trainable weights")
    sizes["trainable"] = tracker.bytes_of(tr.params)
    return sizes


@torch.no_grad()
def _sample_step(tr, tracker: MemoryTracker) -> None:
    """One sample image as ``Trainer.save_final`` makes it: EMA weights swapped in, ``sample_steps`` Euler
    steps of batch 1, decode (the PNG encoding on the host is left out)."""
    from flowbp_kernels import rollout

    cfg, ad = tr.cfg, tr.adapter
    ctx = tr.ema.swapped_in() if tr.ema is not None else contextlib.nullcontext()
    with ctx:
        batch = ad.encode_prompts([tr.prompts[0]])  # encoded at setup: from the prompt cache
        sigmas = ad.sigmas(cfg.sample_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        tracker.phase = "sample: rollout"
        ro = rollout(ad.velocity_fn(batch, sigmas), ad.initial_noise(1, generator=gen), sigmas,
                     latent_dtype=tr.latent_dtype)
        tracker.phase = "sample: decode"
        ad.decode(ro.sample)[0].clamp(0, 1).mul(255).round().byte()
