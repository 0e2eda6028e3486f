"""Seeded plans are pinned: every method draws the same plans from the same generator, release to release.

A training run that resumes, or a study that is rerun, relies on ``Method.plan(N, generator)`` making the
same calls to the generator in the same order. The expected plans below were recorded once from the code
before the methods became specs (commit 1d17ed0): ``python tests/test_plan_pins.py`` (now in tests/kernels/)
on that commit printed ``RECORDED`` (the draws are integer-valued, from torch's CPU generator, so they are
exact on any machine). The last number of each case is the generator's next draw after the plans: it pins
how many random values the plans consumed, so a refactor that draws the same plans with extra calls also
fails.
"""

from __future__ import annotations

import pytest
import torch

import flowbp_kernels as fb

#: (method, options, num_steps, explicit plan arguments): every method at the default N = 25, a tail window,
#: the smallest window each accepts, and options or partial explicit arguments that change what is drawn.
CASES = [
    *[(m, {}, 25, {}) for m in fb.METHODS],
    *[(m, {"tail_ratio": 0.5}, 10, {}) for m in fb.METHODS],
    *[(m, {}, 3, {}) for m in fb.METHODS],
    ("refl", {"last_n": 30, "tail_ratio": 0.3}, 25, {}),
    ("draft-k", {"num_active": 4}, 25, {}),
    ("draft-lv", {"num_noised": 3}, 25, {"noise_seed": 7}),
    ("drtune", {"num_active": 5, "early_stop_ratio": 0.9}, 25, {}),
    ("drtune", {}, 25, {"stop": 18}),
    ("drtune", {}, 25, {"active": [20]}),
    ("leapalign", {"tail_ratio": 0.6}, 25, {"k": 12}),
    ("leapalign", {}, 25, {"j": 20}),
    ("flowbp-sparse", {"num_active": 5, "late_bias": 0.0}, 25, {}),
    ("flowbp-sparse", {"num_active": 30}, 25, {}),
    ("flowbp-bridge", {"num_active": 7, "late_bias": 0.5}, 25, {}),
    ("flowbp-bridge", {"num_active": 2}, 4, {}),
    ("flowbp-bridge", {}, 25, {"j": 12}),
    ("flowbp-lagrange", {"max_j_rev": 3, "dirichlet": (0.5, 0.7, 0.9)}, 25, {}),  # Gamma shapes < 1
    ("flowbp-lagrange", {"order": 5, "max_active_supports": 4, "tail_ratio": 0.8}, 40, {}),
    ("flowbp-lagrange", {}, 25, {"k": 3}),
]
SEED = 20260611
PLANS_PER_CASE = 4


def _describe(plan: fb.Plan) -> str:
    runs: list[list[int]] = []  # the active set with consecutive runs written a-b
    for a in plan.active:
        if runs and a == runs[-1][-1] + 1:
            runs[-1][1:] = [a]
        else:
            runs.append([a])
    fields = [f"s={plan.window_start}", "active=" + ",".join("-".join(map(str, r)) for r in runs)]
    for key in ("k", "j", "tau", "stop", "noise_seed"):
        if getattr(plan, key) is not None:
            fields.append(f"{key}={getattr(plan, key)}")
    return " ".join(fields)


def _draw(method: str, options: dict, num_steps: int, explicit: dict) -> tuple[list[str], int]:
    """PLANS_PER_CASE plans from one generator seeded with SEED, then that generator's next draw."""
    m = fb.get_method(method, **options)
    g = torch.Generator().manual_seed(SEED)
    plans = [_describe(m.plan(num_steps, g, **explicit)) for _ in range(PLANS_PER_CASE)]
    return plans, int(torch.randint(0, 2**31 - 1, (1,), generator=g))


#: recorded on commit 1d17ed0, see the module docstring
RECORDED = [
    # refl N=25
    (["s=0 active=14 tau=14", "s=0 active=17 tau=17", "s=0 active=18 tau=18", "s=0 active=18 tau=18"], 2017068205),
    # draft-k N=25
    (["s=0 active=24", "s=0 active=24", "s=0 active=24", "s=0 active=24"], 752179672),
    # draft-lv N=25
    (["s=0 active=24", "s=0 active=24", "s=0 active=24", "s=0 active=24"], 752179672),
    # drtune N=25
    ([
        "s=0 active=7,15,23 stop=23",
        "s=0 active=7,14,21 stop=22",
        "s=0 active=1,7,13 stop=17",
        "s=0 active=2,7,12 stop=16",
    ], 673953992),
    # full N=25
    (["s=0 active=0-24", "s=0 active=0-24", "s=0 active=0-24", "s=0 active=0-24"], 752179672),
    # leapalign N=25
    ([
        "s=0 active=8,18 k=8 j=18",
        "s=0 active=9,12 k=9 j=12",
        "s=0 active=10,12 k=10 j=12",
        "s=0 active=13,16 k=13 j=16",
    ], 525764346),
    # flowbp-sparse N=25
    (["s=0 active=13,18,20", "s=0 active=10,13,24", "s=0 active=18-19,22", "s=0 active=8,17,23"], 1066226848),
    # flowbp-bridge N=25
    ([
        "s=0 active=8,13,15,17-18 j=18",
        "s=0 active=6-7,9,20,24 j=9",
        "s=0 active=5,10,14,16,19 j=19",
        "s=0 active=11,13,16,20,22 j=22",
    ], 2106079030),
    # flowbp-lagrange N=25
    ([
        "s=0 active=8,14,20,22 k=8 j=20",
        "s=0 active=0,8,18,21 k=0 j=18",
        "s=0 active=8,14,20,22 k=8 j=20",
        "s=0 active=5,13,22-23 k=5 j=22",
    ], 1363732810),
    # refl {"tail_ratio": 0.5} N=10
    (["s=5 active=8 tau=8", "s=5 active=8 tau=8", "s=5 active=7 tau=7", "s=5 active=9 tau=9"], 2017068205),
    # draft-k {"tail_ratio": 0.5} N=10
    (["s=5 active=9", "s=5 active=9", "s=5 active=9", "s=5 active=9"], 752179672),
    # draft-lv {"tail_ratio": 0.5} N=10
    (["s=5 active=9", "s=5 active=9", "s=5 active=9", "s=5 active=9"], 752179672),
    # drtune {"tail_ratio": 0.5} N=10
    (["s=5 active=5-6 stop=6", "s=5 active=6-8 stop=9", "s=5 active=6-8 stop=8", "s=5 active=5-7 stop=7"], 673953992),
    # full {"tail_ratio": 0.5} N=10
    (["s=5 active=5-9", "s=5 active=5-9", "s=5 active=5-9", "s=5 active=5-9"], 752179672),
    # leapalign {"tail_ratio": 0.5} N=10
    ([
        "s=5 active=5,8 k=5 j=8",
        "s=5 active=7,9 k=7 j=9",
        "s=5 active=5-6 k=5 j=6",
        "s=5 active=5-6 k=5 j=6",
    ], 690141088),
    # flowbp-sparse {"tail_ratio": 0.5} N=10
    (["s=5 active=7-9", "s=5 active=7-9", "s=5 active=7-9", "s=5 active=5,8-9"], 1276769382),
    # flowbp-bridge {"tail_ratio": 0.5} N=10
    (["s=5 active=5-9 j=8", "s=5 active=5-9 j=9", "s=5 active=5-9 j=6", "s=5 active=5-9 j=6"], 690141088),
    # flowbp-lagrange {"tail_ratio": 0.5} N=10
    ([
        "s=5 active=6-9 k=6 j=8",
        "s=5 active=5-6,8-9 k=5 j=8",
        "s=5 active=6-9 k=6 j=8",
        "s=5 active=5-6,8-9 k=5 j=8",
    ], 1363732810),
    # refl N=3
    (["s=0 active=0 tau=0", "s=0 active=2 tau=2", "s=0 active=1 tau=1", "s=0 active=1 tau=1"], 2017068205),
    # draft-k N=3
    (["s=0 active=2", "s=0 active=2", "s=0 active=2", "s=0 active=2"], 752179672),
    # draft-lv N=3
    (["s=0 active=2", "s=0 active=2", "s=0 active=2", "s=0 active=2"], 752179672),
    # drtune N=3
    (["s=0 active=0-2 stop=2", "s=0 active=0-2 stop=2", "s=0 active=0-2 stop=2", "s=0 active=0-2 stop=2"], 673953992),
    # full N=3
    (["s=0 active=0-2", "s=0 active=0-2", "s=0 active=0-2", "s=0 active=0-2"], 752179672),
    # leapalign N=3
    ([
        "s=0 active=0,2 k=0 j=2",
        "s=0 active=1-2 k=1 j=2",
        "s=0 active=0-1 k=0 j=1",
        "s=0 active=0-1 k=0 j=1",
    ], 673953992),
    # flowbp-sparse N=3
    (["s=0 active=0-2", "s=0 active=0-2", "s=0 active=0-2", "s=0 active=0-2"], 752179672),
    # flowbp-bridge N=3
    (["s=0 active=0-2 j=2", "s=0 active=0-2 j=2", "s=0 active=0-2 j=1", "s=0 active=0-2 j=1"], 673953992),
    # flowbp-lagrange N=3
    ([
        "s=0 active=0-2 k=0 j=1",
        "s=0 active=0-2 k=0 j=1",
        "s=0 active=0-2 k=0 j=1",
        "s=0 active=0-2 k=0 j=1",
    ], 1363732810),
    # refl {"last_n": 30, "tail_ratio": 0.3} N=25
    (["s=17 active=17 tau=17", "s=17 active=17 tau=17", "s=17 active=24 tau=24", "s=17 active=24 tau=24"], 2017068205),
    # draft-k {"num_active": 4} N=25
    (["s=0 active=21-24", "s=0 active=21-24", "s=0 active=21-24", "s=0 active=21-24"], 752179672),
    # draft-lv {"num_noised": 3} N=25 {"noise_seed": 7}
    ([
        "s=0 active=24 noise_seed=7",
        "s=0 active=24 noise_seed=7",
        "s=0 active=24 noise_seed=7",
        "s=0 active=24 noise_seed=7",
    ], 752179672),
    # drtune {"num_active": 5, "early_stop_ratio": 0.9} N=25
    ([
        "s=0 active=0-3 stop=3",
        "s=0 active=4,7,10,13,16 stop=18",
        "s=0 active=1,5,9,13,17 stop=19",
        "s=0 active=0,2,4,6,8 stop=10",
    ], 673953992),
    # drtune N=25 {"stop": 18}
    ([
        "s=0 active=1,7,13 stop=18",
        "s=0 active=0,6,12 stop=18",
        "s=0 active=6,12,18 stop=18",
        "s=0 active=4,10,16 stop=18",
    ], 2017068205),
    # drtune N=25 {"active": [20]}
    (["s=0 active=20 stop=23", "s=0 active=20 stop=23", "s=0 active=20 stop=22", "s=0 active=20 stop=24"], 2017068205),
    # leapalign {"tail_ratio": 0.6} N=25 {"k": 12}
    ([
        "s=10 active=12,16 k=12 j=16",
        "s=10 active=12,22 k=12 j=22",
        "s=10 active=12,20 k=12 j=20",
        "s=10 active=12,19 k=12 j=19",
    ], 1706659535),
    # leapalign N=25 {"j": 20}
    ([
        "s=0 active=8,20 k=8 j=20",
        "s=0 active=9,20 k=9 j=20",
        "s=0 active=10,20 k=10 j=20",
        "s=0 active=13,20 k=13 j=20",
    ], 525764346),
    # flowbp-sparse {"num_active": 5, "late_bias": 0.0} N=25
    ([
        "s=0 active=3-4,13,18,20",
        "s=0 active=2,4,8,10,13",
        "s=0 active=2,11,18-19,22",
        "s=0 active=1-2,8,13,17",
    ], 1066226848),
    # flowbp-sparse {"num_active": 30} N=25
    (["s=0 active=0-24", "s=0 active=0-24", "s=0 active=0-24", "s=0 active=0-24"], 752179672),
    # flowbp-bridge {"num_active": 7, "late_bias": 0.5} N=25
    ([
        "s=0 active=6,8,13,15,17-18,24 j=18",
        "s=0 active=4,9-10,13,16,21-22 j=16",
        "s=0 active=0,4,8,14-15,22,24 j=15",
        "s=0 active=2,5,11-12,14,16,20 j=14",
    ], 2116516411),
    # flowbp-bridge {"num_active": 2} N=4
    (["s=0 active=0,2 j=2", "s=0 active=2-3 j=3", "s=0 active=2-3 j=3", "s=0 active=1,3 j=3"], 1566249721),
    # flowbp-bridge N=25 {"j": 12}
    ([
        "s=0 active=3,10,12,19,21 j=12",
        "s=0 active=9,11-12,19,22 j=12",
        "s=0 active=10-12,21-22 j=12",
        "s=0 active=4,11-12,21,23 j=12",
    ], 2032436667),
    # flowbp-lagrange {"max_j_rev": 3, "dirichlet": (0.5, 0.7, 0.9)} N=25
    ([
        "s=0 active=19-20,22-23 k=19 j=22",
        "s=0 active=20-23 k=20 j=22",
        "s=0 active=16,19,23-24 k=16 j=23",
        "s=0 active=21-23 k=21 j=22",
    ], 2144053298),
    # flowbp-lagrange {"order": 5, "max_active_supports": 4, "tail_ratio": 0.8} N=40
    ([
        "s=8 active=18,22,26,29,34-36,38 k=18 j=34",
        "s=8 active=9,14,19,25,31,33,35,37 k=9 j=31",
        "s=8 active=19,23,26,29,34-36,38 k=19 j=34",
        "s=8 active=15,20,25,30,36-39 k=15 j=36",
    ], 1363732810),
    # flowbp-lagrange N=25 {"k": 3}
    ([
        "s=0 active=3,11,20,22 k=3 j=20",
        "s=0 active=3,10,18,21 k=3 j=18",
        "s=0 active=3,11,20,22 k=3 j=20",
        "s=0 active=3,12,22-23 k=3 j=22",
    ], 1363732810),
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-N{CASES[i][2]}-{i}")
def test_seeded_plans_are_unchanged(case):
    assert _draw(*CASES[case]) == RECORDED[case]


def test_every_method_is_pinned():
    assert {c[0] for c in CASES} == set(fb.METHODS)
    assert len(RECORDED) == len(CASES)


if __name__ == "__main__":
    print("RECORDED = [")
    for c in CASES:
        plans, nxt = _draw(*c)
        print("    # " + " ".join(str(x) for x in (c[0], c[1] or "", f"N={c[2]}", c[3] or "") if x))
        line = f"    ({plans!r}, {nxt}),"
        if len(line) <= 120:
            print(line)
        else:
            print("    ([" + "".join(f"\n        {p!r}," for p in plans) + f"\n    ], {nxt}),")
    print("]")
