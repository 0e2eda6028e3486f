"""The backward surrogate as data: segments of nodes, input modes, pins and the reward input.

A surrogate is what a method's plan becomes once the schedule is known (shared/design/ALGORITHM.md
section 3): a chain of segments ``xhat_b = x~_a + sum_m w_m u_m`` whose nodes are cached velocities or
re-forwarded ones (each with an input mode and a gradient scale), pinned at their ends, plus the reward
input and the per-sample weight. Executors (``executors.py``) interpret it; methods (``methods.py``)
produce it. Nothing here computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

INPUT_MODES = ("cached", "bridge", "chained")


@dataclass(frozen=True)
class Node:
    """One velocity node ``u_m`` of a segment.

    Attributes:
        index: forward step index m (the velocity ``v_m`` at ``x_m``).
        weight: integration weight ``w_m`` (Euler ``h_m``, a leap width, or a Lagrange weight).
        active: re-forwarded with gradient; else the cached ``sg(v_m)``.
        scale: gradient scale ``rho_m`` of an active node (its value is unchanged).
        input: ``cached`` (``sg(x_m)``), ``bridge`` (``alpha x~ + (1 - alpha) sg(x~)`` of the segment's
            anchor) or ``chained`` (the segment's anchor itself).
        alpha: the bridge coupling (``input == "bridge"`` only).
    """

    index: int
    weight: float
    active: bool = False
    scale: float = 1.0
    input: str = "cached"
    alpha: float = 1.0

    def __post_init__(self):
        if self.input not in INPUT_MODES:
            raise ValueError(f"input must be one of {INPUT_MODES}, got {self.input!r}")


@dataclass(frozen=True)
class Segment:
    """``xhat_end = anchor + sum_nodes w_m u_m``, then ``pin(xhat_end, x_end)`` when ``pin``.

    ``anchor`` is ``"cached"`` (the detached cached latent ``x_start``) or ``"previous"`` (the output of
    the previous segment, which must end at ``start``). Bridge and chained nodes take the anchor as
    their input, so their index must be ``start``.
    """

    start: int
    end: int
    nodes: tuple[Node, ...]
    anchor: str = "cached"
    pin: bool = True

    def __post_init__(self):
        if self.anchor not in ("cached", "previous"):
            raise ValueError(f"anchor must be 'cached' or 'previous', got {self.anchor!r}")
        for n in self.nodes:
            if n.active and n.input != "cached" and n.index != self.start:
                raise ValueError(f"a {n.input} node must sit at its segment's start {self.start}, got {n.index}")

    @property
    def active_nodes(self) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.active)


@dataclass(frozen=True)
class Surrogate:
    """A method's backward surrogate for one plan.

    Attributes:
        segments: chained segments from the noise end to the reward input.
        reward_input: ``"endpoint"`` (the pinned sample) or ``"posterior"`` (an unpinned estimate).
        split: index of the intermediate pin whose residual is ``d_j`` (None if there is none).
        similarity_tau: ``tau`` of the trajectory-similarity weight, or None (weight 1).
        renoise: number of DRaFT-LV re-noised copies of the last step, with their node index, the
            plan's explicit noise seed (or None) and the noise itself once drawn (``renoise_noise``).
    """

    segments: tuple[Segment, ...]
    reward_input: str = "endpoint"
    split: int | None = None
    similarity_tau: float | None = None
    renoise: int = 0
    renoise_index: int | None = None
    renoise_seed: int | None = None
    renoise_noise: tuple = field(default=(), compare=False)
    info: dict = field(default_factory=dict, compare=False)

    @property
    def active(self) -> tuple[int, ...]:
        """Sorted indices of every re-forwarded node."""
        return tuple(sorted({n.index for s in self.segments for n in s.active_nodes}))

    @property
    def num_reforwards(self) -> int:
        return sum(len(s.active_nodes) for s in self.segments) + self.renoise
