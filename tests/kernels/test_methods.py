"""Methods as settings: options, defaults, explicit plans, seeded samplers, validation."""

import math
from collections import Counter

import pytest
import torch

import flowbp_kernels as fb

N = 25


def test_defaults_are_the_authors_flux1_settings():
    assert fb.get_method("flowbp-sparse").options == {"num_active": 3, "late_bias": 2.0, "grad_rescale": 1.0,
                                                      "tail_ratio": 1.0}
    lag = fb.get_method("flowbp-lagrange").options
    assert (lag["order"], lag["alpha"], lag["tau"], lag["grad_rescale"], lag["support_scale"],
            lag["max_active_supports"], lag["dirichlet"]) == (3, 0.1, 0.2, 0.5, 0.25, 2, (2.5, 6.0, 2.0))
    assert fb.get_method("flowbp-bridge").options["alpha"] == 0.1
    assert fb.get_method("leapalign").options["alpha"] == 0.3
    assert fb.get_method("refl").options["last_n"] == 11
    assert fb.get_method("drtune").options["early_stop_ratio"] == 0.4
    assert set(fb.METHODS) == {"refl", "draft-k", "draft-lv", "drtune", "full", "leapalign", "flowbp-sparse",
                               "flowbp-bridge", "flowbp-lagrange"}


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown method 'flowbp'"):
        fb.get_method("flowbp")
    with pytest.raises(ValueError, match="unknown option 'alpha'"):
        fb.get_method("flowbp-sparse", alpha=0.1)
    with pytest.raises(ValueError, match="num_active"):
        fb.get_method("flowbp-sparse", num_active=0)
    with pytest.raises(ValueError, match="tail_ratio"):
        fb.get_method("refl", tail_ratio=1.5)
    with pytest.raises(ValueError, match="num_active must be >= 2"):
        fb.get_method("flowbp-bridge", num_active=1)
    m = fb.get_method("leapalign")
    with pytest.raises(ValueError, match="k must be smaller than j"):
        m.plan(N, k=5, j=5)
    with pytest.raises(ValueError, match="j=25 is outside"):
        m.plan(N, k=1, j=25)
    with pytest.raises(ValueError, match="unknown plan argument 'active'"):
        m.plan(N, active=[1])
    with pytest.raises(ValueError, match=r"active indices \[30\]"):
        fb.get_method("flowbp-sparse").plan(N, active=[1, 30])
    with pytest.raises(ValueError, match="active must contain the bridge index"):
        fb.get_method("flowbp-bridge").plan(N, active=[1, 3], j=5)
    with pytest.raises(ValueError, match="num_steps"):
        m.plan(0)
    with pytest.raises(ValueError, match="tau=-1"):
        fb.get_method("refl").plan(N, tau=-1)


@pytest.mark.parametrize("name", fb.METHODS)
def test_seeded_generator_reproduces_the_plan(name):
    m = fb.get_method(name)
    a = [m.plan(N, torch.Generator().manual_seed(s)) for s in range(5)]
    b = [m.plan(N, torch.Generator().manual_seed(s)) for s in range(5)]
    assert a == b
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert [m.plan(N, g1) for _ in range(4)] == [m.plan(N, g2) for _ in range(4)]


def test_explicit_plans_are_taken_as_given():
    assert fb.get_method("flowbp-sparse").plan(N, active=[9, 2]).active == (2, 9)
    p = fb.get_method("flowbp-lagrange").plan(N, k=6, j=20)
    assert (p.k, p.j) == (6, 20) and p.active == (6, 12, 20, 22)
    assert fb.get_method("refl").plan(N, tau=20).tau == 20
    p = fb.get_method("drtune").plan(N, stop=18, active=[0, 6, 12])
    assert p.stop == 18 and p.active == (0, 6, 12)
    assert fb.get_method("draft-k", num_active=4).plan(N).active == (21, 22, 23, 24)
    assert fb.get_method("full").plan(N).active == tuple(range(N))


def test_samplers_respect_their_ranges():
    g = torch.Generator().manual_seed(0)
    refl = [fb.get_method("refl").plan(N, g).tau for _ in range(300)]
    assert set(refl) == set(range(14, 25))  # reverse index uniform in 1..11
    dr = [fb.get_method("drtune").plan(N, g) for _ in range(300)]
    assert {p.stop for p in dr} == set(range(15, 25))
    for p in dr:
        assert len(p.active) == 3 and max(p.active) <= p.stop
        strides = {b - a for a, b in zip(p.active, p.active[1:])}
        assert strides == {(p.stop + 1) // 3}
    la = [fb.get_method("leapalign").plan(N, g) for _ in range(300)]
    assert all(0 <= p.k < p.j <= N - 1 for p in la)
    br = [fb.get_method("flowbp-bridge").plan(N, g) for _ in range(300)]
    for p in br:
        assert len(p.active) == 5 and p.j in p.active and any(a < p.j for a in p.active)


def test_late_bias_prefers_late_steps():
    g = torch.Generator().manual_seed(1)
    counts = Counter()
    for _ in range(2000):
        counts.update(fb.get_method("flowbp-sparse", num_active=1).plan(N, g).active)
    # p_i ∝ (i + 1)^2: the last step is (25/1)^2 = 625 times as likely as the first
    total = sum((i + 1) ** 2 for i in range(N))
    assert counts[N - 1] / 2000 == pytest.approx(N**2 / total, abs=0.03)
    assert counts[0] < 10


def test_dirichlet_split_matches_its_expectation():
    g = torch.Generator().manual_seed(2)
    plans = [fb.get_method("flowbp-lagrange").plan(N, g) for _ in range(3000)]
    j_rev = [N - p.j for p in plans]
    gap = [p.j - p.k for p in plans]
    k_dist = [p.k for p in plans]
    for p in plans:
        assert 0 <= p.k < p.j <= N - 2
    # (A, B, C) ~ 25 * Dirichlet(2.5, 6, 2): expected lengths 25 * (2.5, 6, 2) / 10.5
    assert sum(j_rev) / len(j_rev) == pytest.approx(1 + 25 * 2.5 / 10.5, abs=0.35)
    assert sum(gap) / len(gap) == pytest.approx(25 * 6 / 10.5, abs=0.35)
    assert sum(k_dist) / len(k_dist) == pytest.approx(25 * 2 / 10.5 - 1, abs=0.35)
    capped = [fb.get_method("flowbp-lagrange", max_j_rev=4).plan(N, g) for _ in range(200)]
    assert all(N - p.j <= 4 for p in capped)


def test_tail_window():
    m = fb.get_method("flowbp-sparse", tail_ratio=0.3)
    s = N - math.ceil(N * 0.3)
    g = torch.Generator().manual_seed(3)
    assert all(min(m.plan(N, g).active) >= s for _ in range(100))
    lag = fb.get_method("flowbp-lagrange", tail_ratio=0.7)
    assert all(lag.plan(N, g).k >= N - math.ceil(N * 0.7) for _ in range(100))


def test_surrogate_structure_of_each_method():
    sig = fb.flow_sigmas(N, shift=3.0)
    sur = fb.get_method("flowbp-lagrange").surrogate(fb.get_method("flowbp-lagrange").plan(N, k=6, j=20), sig)
    first, second = sur.segments
    assert [nd.index for nd in first.nodes] == [6, 12, 19]
    assert [nd.active for nd in first.nodes] == [True, True, False]
    assert second.nodes[0].input == "bridge" and second.nodes[0].alpha == 0.1
    assert first.nodes[1].scale == pytest.approx(0.25 * first.nodes[0].scale)
    w = [nd.weight for nd in first.nodes]
    assert sum(w) == pytest.approx(float(sig[20] - sig[6]), abs=1e-14)
    refl = fb.get_method("refl")
    s2 = refl.surrogate(refl.plan(N, tau=20), sig)
    assert s2.reward_input == "posterior" and not s2.segments[0].pin
    full = fb.get_method("full")
    s3 = full.surrogate(full.plan(N), sig)
    assert len(s3.segments) == N and all(nd.input == "chained" for s in s3.segments for nd in s.nodes)


def test_check_names_the_setting_that_does_not_fit():
    for name in fb.METHODS:
        assert fb.get_method(name).check(N) is None
    cases = [(fb.get_method("flowbp-lagrange"), 2, "num_steps", "training window of at least 3 steps, got 2"),
             (fb.get_method("leapalign", tail_ratio=0.1), 10, "num_steps", "at least 2 steps, got 1"),
             (fb.get_method("flowbp-sparse", num_active=11), 10, "num_active", "11 active steps exceed the 10"),
             (fb.get_method("refl", last_n=20), 10, "last_n", "20 exceeds num_steps=10"),
             (fb.get_method("full"), 0, "num_steps", "num_steps must be an integer >= 1")]
    for method, n, key, text in cases:
        with pytest.raises(fb.WindowError, match=text) as err:
            method.check(n)
        assert err.value.key == key


@pytest.mark.parametrize("name", fb.METHODS)
def test_plan_and_check_agree_on_the_smallest_window(name):
    m = fb.get_method(name, **({"num_active": 2} if name == "flowbp-bridge" else {}))
    for n in range(1, 7):
        window = n - m.window_start(n)
        if window < m.spec.min_window:
            with pytest.raises(ValueError, match="training window of at least"):
                m.plan(n, torch.Generator().manual_seed(0))
            with pytest.raises(fb.WindowError):
                m.check(n)
        else:
            assert m.plan(n, torch.Generator().manual_seed(0)).window_start == m.window_start(n)
