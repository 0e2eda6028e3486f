"""Executors: turn a surrogate into parameter gradients.

``retain`` builds the whole surrogate with autograd and keeps every active node's graph (what the
reference code does; memory grows with the number of active nodes). ``streaming`` first takes
``g = dL/dx~`` by one backward through the reward, then visits the active nodes from the data end back
to the noise end, one model graph at a time, with cotangent ``c_m = w_m rho_m (g + bridge adjoint)``
(shared/design/ALGORITHM.md section 5). Both give the same gradient up to summation order. Every value
that can be non-finite is checked before the first backward into the parameters (so a
NonFiniteLossError leaves ``.grad`` untouched); for DRaFT-LV this means the re-noised copies' graphs
are built together before their backwards.

Forward values come from the cache: a re-forwarded node contributes its gradient, while its value in
the surrogate (and so every residual d and similarity weight) is the cached velocity, which it equals
in exact arithmetic. This keeps the two executors bit-identical in value, makes the pinned reward see
exactly ``x_N``, and lets ``streaming`` know every value before any model forward with gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace

import torch

from flowbp_kernels._rollout import Rollout, VelocityFn
from flowbp_kernels.methods import Method, Plan
from flowbp_kernels.ops import BridgeCoupling, lagrange_leap, pin, surrogate_vjp
from flowbp_kernels.surrogate import Segment, Surrogate

RewardFn = Callable[[torch.Tensor], torch.Tensor]
EXECUTORS = ("streaming", "retain")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the reward, or the similarity weight) is not finite; no gradient was accumulated."""


@dataclass
class StepOutput:
    """What one reward-backprop step returns.

    Attributes:
        loss: scalar loss (detached).
        reward: ``[B]`` reward of the reward input (for DRaFT-LV: of the sample; copies in diagnostics).
        weight: ``[B]`` per-sample weight (1, or the trajectory-similarity weight).
        diagnostics: ``d_j``, ``d_0`` (``[B]`` or None), ``residuals`` per segment, ``active``, the
            plan's ``k``/``j``/``tau``/``stop``, ``nodes`` (per re-forwarded node: index, cotangent
            norm and, when the parameters are known, the norm of its parameter-gradient contribution).
    """

    loss: torch.Tensor
    reward: torch.Tensor
    weight: torch.Tensor
    diagnostics: dict = field(default_factory=dict)


def _loss_fn(spec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if spec == "neg":
        return lambda r, w: -(w * r).mean()
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and spec[0] == "hinge":
        c = float(spec[1])
        if not math.isfinite(c):
            raise ValueError(f"loss hinge margin must be finite, got {spec[1]!r}")
        return lambda r, w: (w * torch.relu(c - r)).mean()
    raise ValueError(f"loss must be 'neg' or ('hinge', c), got {spec!r}")


def _discover_params(out: torch.Tensor, exclude: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``out`` depends on (the AccumulateGrad nodes of its graph)."""
    excluded = {id(t) for t in exclude}
    seen, found, stack = set(), {}, [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and var.requires_grad and id(var) not in excluded:
            found[id(var)] = var
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return list(found.values())


class _GradRecorder:
    """Per-node parameter-gradient contributions, read from hooks on the parameters."""

    def __init__(self, keep_vectors: bool):
        self.keep = keep_vectors
        self.params: list[torch.Tensor] | None = None
        self.handles = []
        self.sq: torch.Tensor | None = None
        self.vectors: dict[int, torch.Tensor] = {}

    def attach(self, params: list[torch.Tensor]):
        self.params = params
        for p in params:
            self.handles.append(p.register_hook(self._make_hook(p)))

    def _make_hook(self, p):
        def hook(grad):
            g = grad.detach()
            s = (g if g.dtype == torch.float64 else g.float()).pow(2).sum()
            self.sq = s if self.sq is None else self.sq + s
            if self.keep:
                prev = self.vectors.get(id(p))
                self.vectors[id(p)] = grad.detach().clone() if prev is None else prev + grad.detach()
            return None

        return hook

    def start(self):
        self.sq, self.vectors = None, {}

    def finish(self) -> tuple[float | None, list[torch.Tensor] | None]:
        norm = None if self.sq is None else float(self.sq.sqrt())
        vecs = None
        if self.keep and self.params is not None:
            vecs = [self.vectors.get(id(p), torch.zeros_like(p)) for p in self.params]
        return norm, vecs

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _segment_values(
    seg: Segment, ro: Rollout
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[float], list[float], torch.Tensor | None]:
    """Cached part (``base``), cached values, weights and scales of the active nodes, and the target."""
    base = None
    for n in seg.nodes:
        if not n.active:
            term = n.weight * ro.velocity(n.index)
            base = term if base is None else base + term
    act = seg.active_nodes
    values = [ro.velocity(n.index) for n in act]
    target = ro.latent(seg.end) if seg.pin else None
    return base, values, [n.weight for n in act], [n.scale for n in act], target


def _leap(anchor, nodes, weights, target, *, scales=None, base=None):
    """A segment: the fused leap over its active nodes, or, without any, ``pin(anchor + base)``."""
    if nodes:
        return lagrange_leap(anchor, nodes, weights, target, scales=scales, base=base)
    xhat = anchor if base is None else anchor + base.to(anchor.dtype)
    if target is None:
        return xhat, None
    with torch.no_grad():
        residual = (xhat.detach() - target.to(xhat.dtype)).abs().flatten(1).mean(dim=1)
    return pin(xhat, target), residual


def _forward_values(sur: Surrogate, ro: Rollout) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Outputs and residuals of every segment, without gradient (values from the cache)."""
    outs, residuals = [], []
    with torch.no_grad():
        for si, seg in enumerate(sur.segments):
            anchor = ro.latent(seg.start) if seg.anchor == "cached" else outs[si - 1]
            base, values, w, _, target = _segment_values(seg, ro)
            out, res = _leap(anchor, values, w, target, base=base)
            outs.append(out)
            residuals.append(res)
    return outs, residuals


def _weight(sur: Surrogate, residuals: list, batch: int, like: torch.Tensor):
    d_0 = residuals[-1] if sur.segments[-1].pin else None
    d_j = None
    if sur.split is not None:
        for seg, res in zip(sur.segments, residuals):
            if seg.end == sur.split:
                d_j = res
    if sur.similarity_tau is None:
        return torch.ones(batch, dtype=like.dtype, device=like.device), d_j, d_0
    tau = sur.similarity_tau
    w = 1.0 / (d_j.clamp_min(tau) + d_0.clamp_min(tau))
    return w, d_j, d_0


def _node_input(node, seg_anchor: torch.Tensor, ro: Rollout) -> torch.Tensor:
    """The model input of an active node, in the dtype the model saw during the rollout."""
    ld = ro.cache.latent_dtype
    if node.input == "cached":
        return ro.cache.latent(node.index).detach()
    x = BridgeCoupling(node.alpha)(seg_anchor) if node.input == "bridge" else seg_anchor
    return x.to(ld)


def _renoise_noise(sur: Surrogate, ro: Rollout, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    """DRaFT-LV's noise, one tensor like ``x_N`` per copy: from the plan's explicit seed when it has one,
    else from ``generator`` (each rank's own; drawn on its device, then moved), else torch's global RNG."""
    if not sur.renoise:
        return ()
    x_n = ro.sample
    if sur.renoise_seed is not None:
        gen, device = torch.Generator(device=x_n.device).manual_seed(int(sur.renoise_seed)), x_n.device
    elif generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"noise_generator must be a torch.Generator or None, got {type(generator).__name__}")
        gen, device = generator, generator.device
    else:
        gen, device = None, x_n.device
    return tuple(torch.randn(x_n.shape, generator=gen, device=device, dtype=x_n.dtype).to(x_n.device)
                 for _ in range(sur.renoise))


def _renoised_inputs(sur: Surrogate, ro: Rollout) -> list[torch.Tensor]:
    if not sur.renoise:
        return []
    s_m = float(ro.sigmas[sur.renoise_index])
    x_n = ro.sample
    return [(1 - s_m) * x_n + s_m * eps for eps in sur.renoise_noise]


def _check_reward(r: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(r, torch.Tensor) or r.shape != (batch,):
        got = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"reward_fn must return a tensor of shape [{batch}], got {got}")
    return r


def reward_backprop(
    method: Method,
    velocity_fn: VelocityFn,
    rollout: Rollout,
    reward_fn: RewardFn,
    *,
    plan: Plan | None = None,
    executor: str = "streaming",
    loss="neg",
    generator: torch.Generator | None = None,
    noise_generator: torch.Generator | None = None,
    params: Iterable[torch.Tensor] | None = None,
    loss_scale: float = 1.0,
    keep_node_grads: bool = False,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    all_finite: Callable[[bool], bool] | None = None,
) -> StepOutput:
    """Accumulate the parameter gradients of one reward-backprop step into ``.grad``.

    Args:
        method: from :func:`get_method`.
        velocity_fn: ``velocity_fn(x, i) -> v`` with gradient (the same callable as the rollout's).
        rollout: the cached rollout of this step.
        reward_fn: ``reward_fn(x) -> [B]`` on latents in the working dtype (the adapter decodes).
        plan: explicit plan; default ``method.plan(N, generator)``.
        executor: ``"streaming"`` (default; one model graph at a time) or ``"retain"``.
        loss: ``"neg"`` (``-mean(w r)``) or ``("hinge", c)`` (``mean(w relu(c - r))``).
        generator: the index sampler's generator when ``plan`` is None.
        noise_generator: where DRaFT-LV's re-noising noise comes from when the plan has no explicit
            ``noise_seed``: each rank's own generator, so that ranks sharing a plan see different noise
            (default: torch's global RNG).
        params: the trainable parameters, for per-node gradient norms (default: the module's
            parameters if ``velocity_fn`` is an ``nn.Module``, else those found in its graph).
        loss_scale: multiplies the loss (e.g. ``1 / cfg_scale`` for CFG gradient compensation).
        keep_node_grads: streaming only; keep each node's parameter-gradient vectors in
            ``diagnostics["node_grads"]`` (for tests and analysis; costs one copy per node).
        no_sync: for data-parallel training, a callable returning a context manager that suspends
            gradient synchronisation (``ddp.no_sync``; FSDP2 ``set_requires_gradient_sync(False)``).
            Every model forward and backward runs inside it except the last model forward (and, for
            streaming, its backward), so gradients are synchronised once per step, not once per node.
        all_finite: for data-parallel training, maps this rank's "loss is finite" to "finite on every
            rank" (an all-reduce), so that all ranks raise :class:`NonFiniteLossError` together, before
            any synchronised backward.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if not isinstance(method, Method):
        raise TypeError(f"method must be a Method from get_method(), got {type(method).__name__}")
    if not isinstance(rollout, Rollout):
        raise TypeError(f"rollout must be a Rollout from rollout(), got {type(rollout).__name__}")
    if not callable(velocity_fn):
        raise TypeError(f"velocity_fn must be callable as velocity_fn(x, i), got {type(velocity_fn).__name__}")
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward_fn(x) -> [B], got {type(reward_fn).__name__}")
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise TypeError(f"loss_scale must be a number, got {type(loss_scale).__name__}")
    if not math.isfinite(float(loss_scale)):
        raise ValueError(f"loss_scale must be finite, got {loss_scale}")
    if rollout.sample.shape[0] == 0:
        raise ValueError("rollout: the batch is empty (batch size 0)")
    loss_of = _loss_fn(loss)
    n = rollout.num_steps
    if plan is None:
        plan = method.plan(n, generator)
    else:
        method.check_plan(plan, n)
    sur = method.surrogate(plan, rollout.sigmas)
    if sur.renoise:
        sur = replace(sur, renoise_noise=_renoise_noise(sur, rollout, noise_generator))
    if params is None and isinstance(velocity_fn, torch.nn.Module):
        params = [p for p in velocity_fn.parameters() if p.requires_grad]
    if params is not None:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors (e.g. a list), got one tensor")
        params = list(params)
        bad = [type(p).__name__ for p in params if not isinstance(p, torch.Tensor)]
        if bad:
            raise TypeError(f"params must hold tensors, got {bad[0]}")
    run = _retain if executor == "retain" else _streaming
    step = _Step(sur=sur, velocity_fn=velocity_fn, ro=rollout, reward_fn=reward_fn, loss_of=loss_of,
                 scale=float(loss_scale), params=params,
                 recorder=_GradRecorder(keep_node_grads and executor == "streaming"),
                 sync=_SyncSchedule(no_sync, sur.num_reforwards, all_finite))
    try:
        out = run(step)
    finally:
        step.recorder.close()
    out.diagnostics.update(
        plan=plan, active=sur.active, k=plan.k, j=plan.j, tau=plan.tau, stop=plan.stop,
        num_reforwards=sur.num_reforwards, executor=executor, surrogate=sur.info,
    )
    return out


class _SyncSchedule:
    """Wraps every model call but the last in ``no_sync()`` (a no-op without one); ``all_finite`` is the
    cross-rank agreement on "the loss is finite" (None: this rank alone)."""

    def __init__(self, no_sync, total: int, all_finite: Callable[[bool], bool] | None = None):
        self.no_sync, self.left = no_sync, total
        self.all_finite = all_finite

    def next(self) -> AbstractContextManager:
        self.left -= 1
        if self.no_sync is None or self.left <= 0:
            return nullcontext()
        return self.no_sync()

    def again(self, ctx: AbstractContextManager) -> AbstractContextManager:
        """A fresh context of the same kind as ``ctx`` (one from :meth:`next`), for a backward that runs
        after its forward's context was left (no_sync contexts are not re-entrant)."""
        return nullcontext() if isinstance(ctx, nullcontext) else self.no_sync()


@dataclass(frozen=True)
class _Step:
    """What an executor reads: this step's surrogate and rollout, the model and the reward, the loss and its
    scale, the parameters (None: found in the graph), the per-node gradient recorder and the sync schedule."""

    sur: Surrogate
    velocity_fn: VelocityFn
    ro: Rollout
    reward_fn: RewardFn
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    scale: float
    params: list[torch.Tensor] | None
    recorder: _GradRecorder
    sync: _SyncSchedule


def _finish_loss(step: _Step, terms, scale: float):
    total = sum(step.loss_of(r, w) for r, w in terms) / len(terms) * scale
    ok = bool(torch.isfinite(total.detach()))
    if step.sync.all_finite is not None:
        ok = step.sync.all_finite(ok)
    if not ok:
        raise NonFiniteLossError(f"non-finite loss (this rank: {float(total.detach())}); no gradient was accumulated")
    return total


def _retain(step: _Step) -> StepOutput:
    sur, ro, sync, velocity_fn, reward_fn = step.sur, step.ro, step.sync, step.velocity_fn, step.reward_fn
    outs, residuals, nodes_info = [], [], []
    with torch.enable_grad():
        for si, seg in enumerate(sur.segments):
            anchor = ro.latent(seg.start) if seg.anchor == "cached" else outs[si - 1]
            base, values, w, scales, target = _segment_values(seg, ro)
            us = []
            for node, val in zip(seg.active_nodes, values):
                with sync.next():
                    v = velocity_fn(_node_input(node, anchor, ro), node.index)
                u = val + (v - v.detach()).to(val.dtype)
                rec = {"index": node.index, "segment": si, "input": node.input}
                u.register_hook(lambda g, rec=rec: rec.__setitem__("cotangent_norm", float(g.norm())))
                nodes_info.append(rec)
                us.append(u)
            out, res = _leap(anchor, us, w, target, scales=scales, base=base)
            outs.append(out)
            residuals.append(res)
        x_r = outs[-1]
        batch = x_r.shape[0]
        r = _check_reward(reward_fn(x_r), batch)
        weight, d_j, d_0 = _weight(sur, residuals, batch, r)
        terms = [(r, weight)]
        copies = []
        for xc in _renoised_inputs(sur, ro):
            m = sur.renoise_index
            with sync.next():
                v = velocity_fn(xc.to(ro.cache.latent_dtype), m)
            rc = _check_reward(reward_fn(xc + (float(ro.sigmas[-1]) - float(ro.sigmas[m])) * v.to(xc.dtype)), batch)
            terms.append((rc, weight))
            copies.append(rc.detach())
        total = _finish_loss(step, terms, step.scale)
        total.backward()
    return _output(sur, total=total, reward=r, weight=weight, d_j=d_j, d_0=d_0, residuals=residuals,
                   nodes=nodes_info, copies=copies)


def _streaming(step: _Step) -> StepOutput:
    sur, ro, sync, velocity_fn, reward_fn = step.sur, step.ro, step.sync, step.velocity_fn, step.reward_fn
    recorder, params, scale = step.recorder, step.params, step.scale
    outs, residuals = _forward_values(sur, ro)
    nodes_info, node_grads = [], []
    n_terms = 1 + sur.renoise

    def run_node(fn_out: torch.Tensor, cot: torch.Tensor, leaf: torch.Tensor | None, rec: dict):
        if recorder.params is None:
            found = params if params is not None else _discover_params(fn_out, [] if leaf is None else [leaf])
            recorder.attach(found)
        recorder.start()
        torch.autograd.backward(fn_out, cot)
        norm, vecs = recorder.finish()
        rec["grad_norm"] = norm
        if vecs is not None:
            node_grads.append(vecs)

    # 1. the reward's gradient w.r.t. its input (no parameter gradient yet)
    with torch.enable_grad():
        x_r = outs[-1].detach().requires_grad_(True)
        batch = x_r.shape[0]
        r = _check_reward(reward_fn(x_r), batch)
        weight, d_j, d_0 = _weight(sur, residuals, batch, r)
        main = _finish_loss(step, [(r, weight)], scale / n_terms)
        (g,) = torch.autograd.grad(main, x_r)
    total = main.detach()

    # 2. DRaFT-LV copies: independent reward terms. Every copy's graph is built and its loss checked
    # before the first backward into the parameters, so a non-finite copy leaves .grad untouched (the
    # NonFiniteLossError promise); the backwards then run in the same order as the copies, which keeps
    # the gradient's accumulation order. The price: the copies' graphs (num_noised) live together.
    copies, pending = [], []
    for xc in _renoised_inputs(sur, ro):
        m = sur.renoise_index
        ctx = sync.next()
        with torch.enable_grad(), ctx:
            v = velocity_fn(xc.to(ro.cache.latent_dtype), m)
            rc = _check_reward(reward_fn(xc + (float(ro.sigmas[-1]) - float(ro.sigmas[m])) * v.to(xc.dtype)), batch)
            lc = step.loss_of(rc, weight) * (scale / n_terms)
        pending.append((lc, ctx))
        copies.append(rc.detach())
    # one check of everything the parameter backwards will use: the reward's input gradient g (a finite
    # loss can still have a non-finite gradient) and every copy's loss
    bad = None if bool(torch.isfinite(g).all()) else "the reward's gradient"
    for lc, _ in pending:
        if bad is None and not bool(torch.isfinite(lc.detach())):
            bad = f"the loss of a re-noised copy ({float(lc.detach())})"
    ok = bad is None if sync.all_finite is None else sync.all_finite(bad is None)
    if not ok:
        raise NonFiniteLossError(f"non-finite value: {bad or 'on another rank'}; no gradient was accumulated")
    for lc, ctx in pending:
        rec = {"index": sur.renoise_index, "segment": None, "input": "renoised", "cotangent_norm": None}
        with torch.enable_grad(), sync.again(ctx):
            run_node(lc, torch.ones_like(lc), None, rec)
        nodes_info.append(rec)
        total = total + lc.detach()
    del pending

    # 3. the adjoint sweep, data end to noise end
    adj: list[torch.Tensor | None] = [None] * len(sur.segments)
    adj[-1] = g
    for si in range(len(sur.segments) - 1, -1, -1):
        seg = sur.segments[si]
        a_out = adj[si]
        anchor_val = ro.latent(seg.start) if seg.anchor == "cached" else outs[si - 1]
        act = sorted(seg.active_nodes, key=lambda nd: -nd.index)
        cots = surrogate_vjp(a_out, None, [nd.weight * nd.scale for nd in act]) if act else []
        prev_adj = a_out if seg.anchor == "previous" else None
        for node, cot in zip(act, cots):
            leaf = None
            with torch.enable_grad(), sync.next():
                if node.input != "cached" and seg.anchor == "previous":
                    leaf = anchor_val.detach().requires_grad_(True)
                    inp = _node_input(node, leaf, ro)
                else:
                    inp = _node_input(node, anchor_val.detach(), ro)
                v = velocity_fn(inp, node.index)
                rec = {"index": node.index, "segment": si, "input": node.input,
                       "cotangent_norm": float(cot.norm())}
                run_node(v, cot.to(v.dtype), leaf, rec)
            nodes_info.append(rec)
            if leaf is not None and leaf.grad is not None:
                prev_adj = prev_adj + leaf.grad
        if seg.anchor == "previous":
            adj[si - 1] = prev_adj
    out = _output(sur, total=total, reward=r, weight=weight, d_j=d_j, d_0=d_0, residuals=residuals,
                  nodes=nodes_info, copies=copies)
    if recorder.keep:
        out.diagnostics["node_grads"] = node_grads
        out.diagnostics["params"] = recorder.params
    return out


def _output(sur: Surrogate, *, total, reward, weight, d_j, d_0, residuals, nodes, copies) -> StepOutput:
    diag = {
        "d_j": d_j,
        "d_0": d_0,
        "residuals": {f"{s.start}->{s.end}": res for s, res in zip(sur.segments, residuals) if res is not None},
        "nodes": nodes,
    }
    if copies:
        diag["renoised_rewards"] = copies
    return StepOutput(loss=total.detach(), reward=reward.detach(), weight=weight.detach(), diagnostics=diag)
