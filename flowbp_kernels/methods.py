"""Every direct-gradient method as a setting of the four choices: one :class:`MethodSpec` per method.

A spec holds all a method knows: its default options, the plan arguments it accepts, its smallest training
window, its draw (the random choices of one step, a :class:`Plan`: active steps, k, j, tau, early stop) and
its build (a plan plus the schedule as a :class:`~flowbp_kernels.surrogate.Surrogate`). :class:`Method`
runs any spec the same way. Samplers and defaults: shared/design/ALGORITHM.md section 4 (the authors'
FLUX.1-dev settings) and REFERENCE.md sections 3-4.5. Index conventions: forward index i (0 = noise end),
reverse index r = N - i; the training window is [s, N) with ``s = N - max(1, ceil(N * tail_ratio))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from flowbp_kernels.quadrature import lagrange_weights, support_nodes
from flowbp_kernels.surrogate import Node, Segment, Surrogate

_INT_OPTIONS = {"last_n", "num_active", "num_noised", "order", "max_active_supports", "max_j_rev"}
#: Upper bounds of the options (input checks only; every default lies well inside). Step counts and
#: indices: a schedule of more than 1000 steps is finer than the 1000 training timesteps the flow models
#: were trained on, so no window needs more.
MAX_STEP_OPTION = 1000
#: DRaFT-LV re-noised copies: each costs one model forward and backward per step (the paper uses 2).
MAX_NUM_NOISED = 16
#: Lagrange order: higher-order interpolation on sigma nodes oscillates (Runge), the authors use 3.
MAX_ORDER = 8
#: Late-bias exponent: p ∝ (offset + 1)^beta over at most 1000 candidates stays finite in float64 up to
#: beta ~ 100; at 32 the last candidate is already drawn almost surely in any window of a few steps.
MAX_LATE_BIAS = 32.0
#: Dirichlet concentrations: beyond 1000 the split is deterministic to well under one slot.
MAX_DIRICHLET = 1000.0
#: Options that interpolate between two behaviours and are meaningful only in [0, 1]: the bridge
#: coupling alpha (gradient share through the bridge input), the sigma-span compensation g (0: none,
#: 1: full) and the support nodes' gradient scale.
_UNIT_OPTIONS = {"alpha", "grad_rescale", "support_scale"}
#: Bridge needs a pre- and a post-segment plus room to sample j (reference ``min_window``).
BRIDGE_MIN_WINDOW = 3


@dataclass(frozen=True)
class Plan:
    """The random choices of one step. ``active`` holds explicit active indices where the method
    samples them (sparse, bridge, draft-k, drtune); ``k``/``j`` the leap indices; ``tau`` ReFL's
    index; ``stop`` DRTune's early-stop index; ``noise_seed`` an explicit seed of DRaFT-LV's re-noising
    noise (None: the noise comes from ``reward_backprop``'s ``noise_generator``, each rank's own)."""

    method: str
    num_steps: int
    window_start: int
    active: tuple[int, ...] = ()
    k: int | None = None
    j: int | None = None
    tau: int | None = None
    stop: int | None = None
    noise_seed: int | None = None

    def as_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


class WindowError(ValueError):
    """:meth:`Method.check`: the method does not fit the schedule. ``key`` names the setting at fault:
    ``"num_steps"`` or the option (``"num_active"``, ``"last_n"``)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------- samplers
def _gen(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        generator = torch.Generator()
        generator.seed()
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen, device=gen.device).item())


def _late_biased(gen: torch.Generator, candidates: Sequence[int], k: int, beta: float) -> list[int]:
    """k distinct candidates without replacement, ``p ∝ (offset + 1)^beta`` (offset in the sorted list)."""
    candidates = sorted(candidates)
    if k >= len(candidates):
        return list(candidates)
    if k <= 0:
        return []
    p = torch.arange(1, len(candidates) + 1, dtype=torch.float64) ** float(beta)
    picks = torch.multinomial(p, k, replacement=False, generator=gen)
    return sorted(candidates[i] for i in picks.tolist())


def _uniform_pair(gen: torch.Generator, num_steps: int, window_start: int) -> tuple[int, int]:
    """Two distinct reverse indices of the window, sorted; returns forward (k, j), k < j."""
    n_rev = num_steps - window_start
    r = (torch.randperm(n_rev, generator=gen)[:2] + 1).tolist()
    return num_steps - max(r), num_steps - min(r)


def _gamma(gen: torch.Generator, shape: float) -> float:
    """Gamma(shape, 1) by Marsaglia and Tsang (2000), using only the given generator."""
    if shape < 1:
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        return _gamma(gen, shape + 1) * u ** (1 / shape)
    d = shape - 1 / 3
    c = 1 / math.sqrt(9 * d)
    while True:
        x = float(torch.randn((), generator=gen, dtype=torch.float64))
        v = (1 + c * x) ** 3
        if v <= 0:
            continue
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if math.log(max(u, 1e-300)) < 0.5 * x * x + d - d * v + d * math.log(v):
            return d * v


def _dirichlet_pair(
    gen: torch.Generator, num_steps: int, window_start: int, conc: Sequence[float], max_j_rev: int | None
) -> tuple[int, int]:
    """Split the window's reverse slots into (A, B, C) = round(n * Dirichlet(conc)), each >= 1:
    A = distance of j from the clean end, B = the k..j gap, C = distance of k from the noise end."""
    n = num_steps - window_start
    g = [_gamma(gen, float(a)) for a in conc]
    total = sum(g)
    parts = [max(1, round(n * x / total)) for x in g]
    diff = n - sum(parts)
    while diff != 0:
        order = sorted(range(3), key=lambda i: -parts[i])
        for i in order:
            if diff > 0:
                parts[i] += 1
                diff -= 1
                break
            if parts[i] > 1:
                parts[i] -= 1
                diff += 1
                break
    a, b, c = parts
    j_rev = 1 + a
    if max_j_rev is not None and j_rev > max_j_rev:
        over = j_rev - max_j_rev
        a -= over
        c += over
        j_rev = 1 + a
    k_rev = 1 + a + b
    return num_steps - k_rev, num_steps - j_rev


def _bridge_active(o: dict, gen: torch.Generator, n: int, s: int, j: int) -> tuple[int, ...]:
    """num_active late-biased steps split between the pre-segment [s, j) and the post-segment [j, n) by
    length; the post-segment always holds j."""
    k_total = o["num_active"]
    l_pre, l_post = j - s, n - j
    # the post-segment always holds j, so the pre-segment takes at most k_total - 1
    k_pre = min(max(round(k_total * l_pre / (l_pre + l_post)), 1), l_pre, k_total - 1)
    k_post = min(max(k_total - k_pre, 1), l_post)
    left = k_total - k_pre - k_post
    if left > 0:
        add = min(left, l_pre - k_pre)
        k_pre += add
        k_post += min(left - add, l_post - k_post)
    pre = _late_biased(gen, range(s, j), k_pre, o["late_bias"])
    post = _late_biased(gen, range(j + 1, n), k_post - 1, o["late_bias"])
    return tuple(sorted([*pre, j, *post]))


def _rho(window_abs: float, active_abs: float, g: float) -> float:
    """Sigma-span compensation ``1 + g (sum_window |w| / sum_active |w| - 1)``."""
    if active_abs <= 0:
        return 1.0
    return 1.0 + g * (window_abs / active_abs - 1.0)


def _leap_pair(explicit: dict, sample: Callable[[], tuple[int, int]]) -> tuple[int, int]:
    """The leap indices (k, j): the explicit ones, the missing ones from ``sample()``; k < j."""
    k, j = explicit.get("k"), explicit.get("j")
    if k is None or j is None:
        dk, dj = sample()
        k = dk if k is None else k
        j = dj if j is None else j
    if not k < j:
        raise ValueError(f"k must be smaller than j (k is the noisier index), got k={k}, j={j}")
    return k, j


# ------------------------------------------------------------------------------------- the nine methods
# draw(o, n, s, explicit, gen) -> the plan's fields: the explicit arguments (already checked to be in the
# window) where given, else drawn from gen (which is None when the draw needs no random value).
# build(o, plan, sg, h, info) -> the surrogate on the schedule sg = [s_0 .. s_N], h_i = s_{i+1} - s_i.

def _draw_full(o, n, s, ex, gen):
    return {"active": tuple(range(s, n))}


def _build_chain(o, plan, sg, h, info):
    """full and draft-k: Euler segments chained through every step from the first active one."""
    act = set(plan.active)
    first = min(act)
    segs = tuple(
        Segment(i, i + 1, (Node(i, h[i], active=i in act, input="chained" if i in act else "cached"),),
                anchor="cached" if i == first else "previous")
        for i in range(first, plan.num_steps)
    )
    return Surrogate(segs, info=info)


def _draw_draft_k(o, n, s, ex, gen):
    return {"active": ex.get("active") or tuple(range(max(s, n - o["num_active"]), n))}


def _draw_draft_lv(o, n, s, ex, gen):  # the plan is the same on every rank; the noise is per rank
    return {"active": (n - 1,), "noise_seed": ex.get("noise_seed")}


def _build_draft_lv(o, plan, sg, h, info):
    n = plan.num_steps
    m = n - 1
    seg = Segment(m, n, (Node(m, h[m], active=True),))
    return Surrogate((seg,), renoise=o["num_noised"], renoise_index=m, renoise_seed=plan.noise_seed, info=info)


def _check_draft_lv_plan(method: Method, plan: Plan) -> Plan:
    """A DRaFT-LV plan has no draw to re-derive: its seed is None or in torch's seed range."""
    n = plan.num_steps
    if plan.noise_seed is not None and not 0 <= plan.noise_seed < 2**63:
        raise ValueError(f"plan.noise_seed: expected None (the noise generator's draw) or an integer in "
                         f"[0, 2**63), got {plan.noise_seed!r}")
    if plan.active != (n - 1,):
        raise ValueError(f"plan.active: draft-lv re-forwards the last step only, expected {(n - 1,)}, "
                         f"got {plan.active}")
    return plan


def _draw_refl(o, n, s, ex, gen):
    tau = ex.get("tau")
    if tau is None:
        tau = n - _randint(gen, 1, min(o["last_n"], n - s))
    return {"active": (tau,), "tau": tau}


def _build_refl(o, plan, sg, h, info):
    t, n = plan.tau, plan.num_steps
    seg = Segment(t, n, (Node(t, sg[n] - sg[t], active=True),), pin=False)
    return Surrogate((seg,), reward_input="posterior", info=info)


def _draw_drtune(o, n, s, ex, gen):
    stop = ex.get("stop")
    if stop is None:
        r_max = max(1, min(round(o["early_stop_ratio"] * n), n - s))
        stop = n - _randint(gen, 1, r_max)
    act = ex.get("active")
    if act is None:
        span = stop - s + 1
        k = min(o["num_active"], span)
        stride = max(1, span // k)
        start = _randint(gen, s, stop - (k - 1) * stride)
        act = tuple(start + q * stride for q in range(k))
    elif max(act) > stop:
        raise ValueError(f"active indices must not exceed stop={stop}, got {list(act)}")
    return {"active": act, "stop": stop}


def _build_drtune(o, plan, sg, h, info):
    act, s, n, stop = set(plan.active), plan.window_start, plan.num_steps, plan.stop
    nodes = [Node(i, h[i], active=i in act) for i in range(s, stop)]
    nodes.append(Node(stop, sg[n] - sg[stop], active=stop in act))
    return Surrogate((Segment(s, n, tuple(nodes), pin=False),), reward_input="posterior", info=info)


def _draw_sparse(o, n, s, ex, gen):
    act = ex.get("active")
    if act is None:
        act = tuple(_late_biased(gen, range(s, n), o["num_active"], o["late_bias"]))
    return {"active": act}


def _build_sparse(o, plan, sg, h, info):
    act, s, n = set(plan.active), plan.window_start, plan.num_steps
    rho = _rho(sum(abs(x) for x in h[s:]), sum(abs(h[i]) for i in act), o["grad_rescale"])
    info["rho"] = rho
    seg = Segment(s, n, tuple(Node(i, h[i], active=i in act, scale=rho) for i in range(s, n)))
    return Surrogate((seg,), info=info)


def _draw_bridge(o, n, s, ex, gen):
    j, act = ex.get("j"), ex.get("active")
    if act is not None and j is None:
        raise ValueError("flowbp-bridge: pass j= together with an explicit active=")
    if j is None:
        _, j = _uniform_pair(gen, n, s)
    if not s < j < n:
        raise ValueError(f"j={j} must leave a pre-segment: need {s} < j < {n}")
    if act is None:
        act = _bridge_active(o, gen, n, s, j)
    elif j not in act:
        raise ValueError(f"active must contain the bridge index j={j}, got {list(act)}")
    return {"active": tuple(sorted(act)), "j": j}


def _build_bridge(o, plan, sg, h, info):
    act, j, s, n = set(plan.active), plan.j, plan.window_start, plan.num_steps
    rho = _rho(sum(abs(x) for x in h[s:]), sum(abs(h[i]) for i in act), o["grad_rescale"])
    info["rho"] = rho
    pre = Segment(s, j, tuple(Node(i, h[i], active=i in act, scale=rho) for i in range(s, j)))
    post_nodes = tuple(
        Node(i, h[i], active=i in act, scale=rho, input="bridge" if i == j else "cached", alpha=o["alpha"])
        for i in range(j, n)
    )
    post = Segment(j, n, post_nodes, anchor="previous")
    return Surrogate((pre, post), split=j, info=info)


def _check_bridge_options(o: dict) -> None:
    if o["num_active"] < 2:
        raise ValueError(f"flowbp-bridge: num_active must be >= 2 (one before and one at the split), "
                         f"got {o['num_active']}")


def _draw_leapalign(o, n, s, ex, gen):
    k, j = _leap_pair(ex, lambda: _uniform_pair(gen, n, s))
    return {"active": (k, j), "k": k, "j": j}


def _build_leapalign(o, plan, sg, h, info):
    k, j, n = plan.k, plan.j, plan.num_steps
    first = Segment(k, j, (Node(k, sg[j] - sg[k], active=True),))
    second = Segment(j, n, (Node(j, sg[n] - sg[j], active=True, input="bridge", alpha=o["alpha"]),),
                     anchor="previous")
    return Surrogate((first, second), split=j, similarity_tau=o["tau"], info=info)


def _draw_lagrange(o, n, s, ex, gen):
    k, j = _leap_pair(ex, lambda: _dirichlet_pair(gen, n, s, o["dirichlet"], o["max_j_rev"]))
    m, order = o["max_active_supports"], o["order"]
    act = tuple(sorted({*support_nodes(k, j, order, n)[:m], *support_nodes(j, n, order, n)[:m]}))
    return {"active": act, "k": k, "j": j}


def _build_lagrange(o, plan, sg, h, info):
    k, j, n = plan.k, plan.j, plan.num_steps
    segs = []
    for a, b, anchor in ((k, j, "cached"), (j, n, "previous")):
        idx = support_nodes(a, b, o["order"], n)
        w = lagrange_weights([sg[m] for m in idx], sg[a], sg[b]).tolist()
        n_act = min(o["max_active_supports"], len(idx))
        rho = _rho(sum(abs(x) for x in w), sum(abs(x) for x in w[:n_act]), o["grad_rescale"])
        info[f"rho_{a}_{b}"] = rho
        info[f"nodes_{a}_{b}"] = idx
        nodes = tuple(
            Node(m, wm, active=q < n_act, scale=rho if q == 0 else o["support_scale"] * rho,
                 input="bridge" if (q == 0 and anchor == "previous") else "cached", alpha=o["alpha"])
            for q, (m, wm) in enumerate(zip(idx, w))
        )
        segs.append(Segment(a, b, nodes, anchor=anchor))
    return Surrogate(tuple(segs), split=j, similarity_tau=o["tau"], info=info)


@dataclass(frozen=True, eq=False)
class MethodSpec:
    """All one method knows.

    Attributes:
        name: the method's name.
        defaults: its options and their defaults (the authors' FLUX.1-dev settings; ``tail_ratio`` is added
            to every method).
        explicit: the plan arguments :meth:`Method.plan` accepts instead of drawing them.
        draw: ``draw(options, num_steps, window_start, explicit, generator) -> {plan field: value}``.
        build: ``build(options, plan, sigmas, widths, info) -> Surrogate``.
        random: whether the draw uses the generator for a plan argument that is not given.
        min_window: the fewest steps of training window the method's plan needs.
        check_options: extra rules of the options, beyond each option's range.
        check_plan: validation of a hand-made plan where re-deriving it from its explicit arguments (the
            default) does not apply.
    """

    name: str
    defaults: dict
    explicit: tuple[str, ...]
    draw: Callable[..., dict]
    build: Callable[..., Surrogate]
    random: bool = True
    min_window: int = 1
    check_options: Callable[[dict], None] | None = None
    check_plan: Callable[[Method, Plan], Plan] | None = None


#: The nine methods: name, default options, explicit plan arguments, draw, build, then what differs.
SPECS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("refl", {"last_n": 11}, ("tau",), _draw_refl, _build_refl),
    MethodSpec("draft-k", {"num_active": 1}, ("active",), _draw_draft_k, _build_chain, random=False),
    MethodSpec("draft-lv", {"num_noised": 2}, ("noise_seed",), _draw_draft_lv, _build_draft_lv, random=False,
               check_plan=_check_draft_lv_plan),
    MethodSpec("drtune", {"num_active": 3, "early_stop_ratio": 0.4}, ("stop", "active"), _draw_drtune,
               _build_drtune),
    MethodSpec("full", {}, (), _draw_full, _build_chain, random=False),
    MethodSpec("leapalign", {"alpha": 0.3, "tau": 0.1}, ("k", "j"), _draw_leapalign, _build_leapalign,
               min_window=2),  # two distinct steps k < j
    MethodSpec("flowbp-sparse", {"num_active": 3, "late_bias": 2.0, "grad_rescale": 1.0}, ("active",),
               _draw_sparse, _build_sparse),
    MethodSpec("flowbp-bridge", {"num_active": 5, "late_bias": 2.0, "grad_rescale": 1.0, "alpha": 0.1},
               ("active", "j"), _draw_bridge, _build_bridge, min_window=BRIDGE_MIN_WINDOW,
               check_options=_check_bridge_options),
    MethodSpec("flowbp-lagrange", {"order": 3, "alpha": 0.1, "tau": 0.2, "grad_rescale": 0.5, "support_scale": 0.25,
                                   "max_active_supports": 2, "dirichlet": (2.5, 6.0, 2.0), "max_j_rev": None},
               ("k", "j"), _draw_lagrange, _build_lagrange, min_window=3),  # a slot each for A, B and C
)}
METHODS = tuple(SPECS)
#: Default options per method (a copy of the specs'). ``tail_ratio`` is added to every one.
DEFAULTS: dict[str, dict] = {name: dict(spec.defaults) for name, spec in SPECS.items()}


# ---------------------------------------------------------------------------------------------- Method
def _check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")


def _check_explicit(explicit: dict, n: int, s: int) -> dict:
    """Explicit plan arguments checked against the window [s, n): ``active`` as a sorted tuple."""
    if "active" in explicit:
        act = explicit["active"]
        if isinstance(act, torch.Tensor):
            act = act.tolist()
        if isinstance(act, (str, bytes)) or not hasattr(act, "__iter__"):
            raise ValueError(f"active must be a list of step indices, got {act!r}")
        act = list(act)
        if any(isinstance(a, bool) or not isinstance(a, int) for a in act):
            raise ValueError(f"active must hold integer step indices, got {act}")
        if not act or len(set(act)) != len(act):
            raise ValueError(f"active must be a non-empty list of distinct indices, got {act}")
        bad = [a for a in act if not s <= a < n]
        if bad:
            raise ValueError(f"active indices {bad} are outside the training window [{s}, {n})")
        explicit["active"] = tuple(sorted(act))
    for key in ("k", "j", "tau", "stop", "noise_seed"):
        if key not in explicit:
            continue
        val = explicit[key]
        if key == "noise_seed":
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"noise_seed must be an integer >= 0, got {val!r}")
            continue
        if isinstance(val, bool) or not isinstance(val, int):
            raise ValueError(f"{key} must be an int, got {val!r}")
        if not s <= val < n:
            raise ValueError(f"{key}={val} is outside the training window [{s}, {n})")
    return explicit


@dataclass
class Method:
    """A direct-gradient method: a name and its options (see :data:`DEFAULTS`).

    ``plan(num_steps, generator)`` draws the random choices; ``surrogate(plan, sigmas)`` builds the
    backward surrogate; ``check(num_steps)`` says whether the method fits a schedule. Use
    :func:`get_method` to construct one with validated options.
    """

    name: str
    options: dict = field(default_factory=dict)

    @property
    def spec(self) -> MethodSpec:
        return SPECS[self.name]

    # ------------------------------------------------------------------ plans
    def window_start(self, num_steps: int) -> int:
        return num_steps - max(1, math.ceil(num_steps * self.options["tail_ratio"]))

    def _needs_random(self, explicit: dict) -> bool:
        return self.spec.random and any(key not in explicit for key in self.spec.explicit)

    def _window_message(self, n: int) -> str:
        return (f"{self.name} needs a training window of at least {self.spec.min_window} steps, got "
                f"{n - self.window_start(n)} (num_steps={n}, tail_ratio={self.options['tail_ratio']})")

    def check(self, num_steps: int) -> None:
        """Whether the method fits a schedule of ``num_steps``: a training window of at least the method's
        minimum, ``num_active`` within the window and ReFL's ``last_n`` within the schedule (:meth:`plan`
        clamps these two; a configuration that asks for more is a mistake). Raises :class:`WindowError`
        naming the setting at fault in its ``key``."""
        try:
            _check_num_steps(num_steps)
        except ValueError as exc:
            raise WindowError("num_steps", str(exc)) from None
        n, o = num_steps, self.options
        window = n - self.window_start(n)
        if "num_active" in o and o["num_active"] > window:
            raise WindowError("num_active", f"{o['num_active']} active steps exceed the {window} steps of the "
                                            f"training window (num_steps={n}, tail_ratio={o['tail_ratio']})")
        if "last_n" in o and o["last_n"] > n:
            raise WindowError("last_n", f"{o['last_n']} exceeds num_steps={n}")
        if window < self.spec.min_window:
            raise WindowError("num_steps", self._window_message(n))

    def plan(self, num_steps: int, generator: torch.Generator | None = None, **explicit) -> Plan:
        """Draw this step's random choices (from ``generator``), or take them from ``explicit``.

        Explicit arguments (per method): ``active=[...]`` (flowbp-sparse, flowbp-bridge, draft-k,
        drtune), ``k=``, ``j=`` (leapalign, flowbp-lagrange; ``j`` for flowbp-bridge), ``tau=`` (refl),
        ``stop=`` (drtune), ``noise_seed=`` (draft-lv). Raises ValueError naming the argument when a value
        is out of range.
        """
        _check_num_steps(num_steps)
        spec = self.spec
        for key in explicit:
            if key not in spec.explicit:
                raise ValueError(f"{self.name}: unknown plan argument {key!r}; accepted: {spec.explicit or 'none'}")
        explicit = {k: v for k, v in explicit.items() if v is not None}
        n, s = num_steps, self.window_start(num_steps)
        gen = _gen(generator) if self._needs_random(explicit) else None
        explicit = _check_explicit(explicit, n, s)
        if n - s < spec.min_window:
            raise ValueError(self._window_message(n))
        return replace(Plan(self.name, n, s), **spec.draw(self.options, n, s, explicit, gen))

    def check_plan(self, plan: Plan, num_steps: int | None = None) -> Plan:
        """Validate a plan built by hand like :meth:`plan` validates its arguments: the method, the number
        of steps and window, integer fields in range, and the choices the method derives from them
        (re-derived from the plan's explicit arguments and compared). Raises ValueError naming the field."""
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a Plan from Method.plan(), got {type(plan).__name__}")
        if plan.method != self.name:
            raise ValueError(f"plan.method: the plan is for {plan.method!r}, not {self.name!r}")
        for key in ("num_steps", "window_start", "k", "j", "tau", "stop", "noise_seed"):
            val = getattr(plan, key)
            if val is not None and (isinstance(val, bool) or not isinstance(val, int)):
                raise ValueError(f"plan.{key} must be an integer, got {val!r}")
        n = plan.num_steps
        if n is None or n < 1:
            raise ValueError(f"plan.num_steps: expected an integer >= 1, got {n!r}")
        if num_steps is not None and n != num_steps:
            raise ValueError(f"plan.num_steps: plan is for {n} steps, the rollout has {num_steps}")
        if plan.window_start != self.window_start(n):
            raise ValueError(f"plan.window_start: expected {self.window_start(n)} for num_steps={n} and "
                             f"tail_ratio={self.options['tail_ratio']}, got {plan.window_start!r}")
        if not isinstance(plan.active, tuple):
            raise ValueError(f"plan.active must be a tuple of step indices, got {type(plan.active).__name__}")
        spec = self.spec
        if spec.check_plan is not None:
            return spec.check_plan(self, plan)
        explicit = {k: getattr(plan, k) for k in spec.explicit}
        if "active" in explicit:
            explicit["active"] = list(plan.active)
        if self._needs_random({k: v for k, v in explicit.items() if v is not None}):
            missing = [k for k in spec.explicit if getattr(plan, k) is None or (k == "active" and not plan.active)]
            raise ValueError(f"plan: a {self.name} plan needs {', '.join(missing)}")
        try:
            want = self.plan(n, None, **explicit)
        except ValueError as exc:
            raise ValueError(f"plan: {exc}") from None
        for key in ("active", "k", "j", "tau", "stop"):
            if getattr(plan, key) != getattr(want, key):
                raise ValueError(f"plan.{key}: {self.name} derives {getattr(want, key)!r} from the plan's "
                                 f"{', '.join(spec.explicit)}, got {getattr(plan, key)!r}")
        return plan

    # ------------------------------------------------------------------ surrogates
    def surrogate(self, plan: Plan, sigmas: torch.Tensor) -> Surrogate:
        """The backward surrogate of ``plan`` on the schedule ``sigmas`` (``[N + 1]``)."""
        if plan.method != self.name:
            raise ValueError(f"plan is for method {plan.method!r}, not {self.name!r}")
        sig = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
        n = plan.num_steps
        if sig.numel() != n + 1:
            raise ValueError(f"sigmas must have num_steps + 1 = {n + 1} entries, got {sig.numel()}")
        sg = sig.tolist()
        h = [sg[i + 1] - sg[i] for i in range(n)]
        return self.spec.build(self.options, plan, sg, h, {"plan": plan.as_dict()})


def get_method(name: str, **options) -> Method:
    """A method by name with validated options (defaults: :data:`DEFAULTS`, plus ``tail_ratio=1.0``).

    Names: ``refl``, ``draft-k``, ``draft-lv``, ``drtune``, ``full``, ``leapalign``, ``flowbp-sparse``,
    ``flowbp-bridge``, ``flowbp-lagrange``. Unknown names or options, and out-of-range values, raise
    ValueError naming them.
    """
    if not isinstance(name, str) or name.lower() not in SPECS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    spec = SPECS[name.lower()]
    opts = dict(spec.defaults)
    opts["tail_ratio"] = 1.0
    for key, val in options.items():
        if key not in opts:
            raise ValueError(f"{spec.name}: unknown option {key!r}; accepted: {', '.join(sorted(opts))}")
        opts[key] = _check_option(spec.name, key, val)
    if spec.check_options is not None:
        spec.check_options(opts)
    return Method(spec.name, opts)


def _is_number(val) -> bool:
    return not isinstance(val, bool) and isinstance(val, (int, float))


def _check_option(method: str, key: str, val):
    if key == "dirichlet":
        if isinstance(val, (str, bytes)) or not isinstance(val, (list, tuple)) or len(val) != 3 or not all(
                _is_number(x) and math.isfinite(x) and 0 < x <= MAX_DIRICHLET for x in val):
            raise ValueError(f"{method}: dirichlet must be a list of three numbers in (0, {MAX_DIRICHLET:g}], "
                             f"got {val!r}")
        return tuple(float(x) for x in val)
    if key == "max_j_rev" and val is None:
        return None
    if key in _INT_OPTIONS:
        hi = {"num_noised": MAX_NUM_NOISED, "order": MAX_ORDER, "max_active_supports": MAX_ORDER + 1}.get(
            key, MAX_STEP_OPTION)
        if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= hi:
            raise ValueError(f"{method}: {key} must be an integer in [1, {hi}], got {val!r}")
        return val
    if not _is_number(val) or not math.isfinite(val):
        raise ValueError(f"{method}: {key} must be a finite number, got {val!r}")
    val = float(val)
    if key in ("tail_ratio", "early_stop_ratio") and not 0 < val <= 1:
        raise ValueError(f"{method}: {key} must be in (0, 1], got {val}")
    if key in _UNIT_OPTIONS and not 0 <= val <= 1:
        raise ValueError(f"{method}: {key} must be in [0, 1], got {val}")
    if key == "late_bias" and not 0 <= val <= MAX_LATE_BIAS:
        raise ValueError(f"{method}: late_bias must be in [0, {MAX_LATE_BIAS:g}], got {val}")
    if key == "tau" and not val > 0:
        raise ValueError(f"{method}: tau must be > 0 (the similarity weight's floor), got {val}")
    if val < 0:
        raise ValueError(f"{method}: {key} must be >= 0, got {val}")
    return val
