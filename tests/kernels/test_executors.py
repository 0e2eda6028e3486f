"""Exactness of the executors (ALGORITHM.md section 6, items 1-5), float64, against computations
written here independently: plain autograd through the Euler loop, the authors' surrogate written with
detach/pin arithmetic, per-node VJPs and torch.func Jacobian products."""

import pytest
import torch

import flowbp_kernels as fb
from flowbp_kernels import lagrange_weights, support_nodes

from helpers.engine import TinyReward, TinyVelocity, flat_grad, rel_err

TOL = 1e-10
PINNED = ["draft-k", "draft-lv", "full", "leapalign", "flowbp-sparse", "flowbp-bridge", "flowbp-lagrange"]


NOISE_SEED = 11  # DRaFT-LV's re-noising generator (a rank's own) when the plan carries no noise_seed


def noise_generator():
    return torch.Generator().manual_seed(NOISE_SEED)


def run(net, ro, reward, name, plan, executor, loss="neg", **opts):
    net.zero_grad()
    out = fb.reward_backprop(fb.get_method(name, **opts), net, ro, reward, plan=plan, executor=executor, loss=loss,
                             noise_generator=noise_generator())
    return flat_grad(net), out


def sg(x):
    return x.detach()


def pin(xhat, x):
    return xhat + sg(x - xhat)


def rescale(v, r):
    return sg(v) + r * (v - sg(v))


def rho_of(window_abs, active_abs, g):
    return 1 + g * (window_abs / active_abs - 1)


def authors_loss(name, plan, net, ro, R, opts, loss="neg"):
    """The surrogate as the reference code writes it: plain autograd, re-forwarded values."""
    o = {**fb.DEFAULTS[name], **opts}
    n = ro.num_steps
    sig = ro.sigmas.tolist()
    h = [sig[i + 1] - sig[i] for i in range(n)]
    X = [ro.latent(i) for i in range(n)]
    V = [ro.velocity(i) for i in range(n)]
    xN = ro.sample
    s0 = plan.window_start
    weight = torch.ones(xN.shape[0], dtype=xN.dtype)
    extra = []

    def mean_abs(a, b):
        return (a - b).abs().flatten(1).mean(1).detach()

    if name == "full" or name == "draft-k":
        act = plan.active
        x = X[min(act)]
        for i in range(min(act), n):
            x = x + h[i] * (net(x, i) if i in act else V[i])
        rin = x
    elif name == "refl":
        t = plan.tau
        rin = X[t] - sig[t] * net(X[t], t)
    elif name == "drtune":
        x = X[s0]
        for i in range(s0, plan.stop):
            x = x + h[i] * (net(X[i], i) if i in plan.active else V[i])
        st = plan.stop
        rin = x - sig[st] * (net(X[st], st) if st in plan.active else V[st])
    elif name == "draft-lv":
        m = n - 1
        rin = pin(X[m] + h[m] * net(X[m], m), xN)
        gen = noise_generator() if plan.noise_seed is None else torch.Generator().manual_seed(plan.noise_seed)
        for _ in range(o["num_noised"]):
            eps = torch.randn(xN.shape, generator=gen, dtype=xN.dtype)
            xc = (1 - sig[m]) * xN + sig[m] * eps
            extra.append(xc - sig[m] * net(xc, m))
    elif name == "leapalign":
        k, j = plan.k, plan.j
        xj_hat = X[k] + (sig[j] - sig[k]) * net(X[k], k)
        xj = pin(xj_hat, X[j])
        vj = net(o["alpha"] * xj + (1 - o["alpha"]) * sg(xj), j)
        x0_hat = xj - sig[j] * vj
        rin = pin(x0_hat, xN)
        tau = o["tau"]
        weight = 1 / (mean_abs(xj_hat, X[j]).clamp_min(tau) + mean_abs(x0_hat, xN).clamp_min(tau))
    elif name in ("flowbp-sparse", "flowbp-bridge"):
        act = set(plan.active)
        rho = rho_of(sum(abs(x) for x in h[s0:]), sum(abs(h[i]) for i in act), o["grad_rescale"])
        j = plan.j if name == "flowbp-bridge" else n
        x = X[s0]
        for i in range(s0, j):
            x = x + h[i] * (rescale(net(X[i], i), rho) if i in act else V[i])
        if name == "flowbp-bridge":
            xj = pin(x, X[j])
            x = xj + h[j] * rescale(net(o["alpha"] * xj + (1 - o["alpha"]) * sg(xj), j), rho)
            for i in range(j + 1, n):
                x = x + h[i] * (rescale(net(X[i], i), rho) if i in act else V[i])
        rin = pin(x, xN)
    elif name == "flowbp-lagrange":
        k, j = plan.k, plan.j
        P, na = o["order"], o["max_active_supports"]
        x = X[k]
        residual = []
        for a, b, target in ((k, j, X[j]), (j, n, xN)):
            nodes = support_nodes(a, b, P, n)
            w = lagrange_weights([sig[m] for m in nodes], sig[a], sig[b]).tolist()
            rho = rho_of(sum(abs(v) for v in w), sum(abs(v) for v in w[:na]), o["grad_rescale"])
            xa = x
            xhat = xa
            for q, (m, wm) in enumerate(zip(nodes, w)):
                if q >= na:
                    u = V[m]
                elif q == 0 and a == j:
                    u = rescale(net(o["alpha"] * xa + (1 - o["alpha"]) * sg(xa), m), rho)
                else:
                    u = rescale(net(X[m], m), rho * (1 if q == 0 else o["support_scale"]))
                xhat = xhat + wm * u
            residual.append(mean_abs(xhat, target))
            x = pin(xhat, target)
        rin = x
        tau = o["tau"]
        weight = 1 / (residual[0].clamp_min(tau) + residual[1].clamp_min(tau))
    else:
        raise AssertionError(name)

    def lf(r):
        if loss == "neg":
            return -(weight * r).mean()
        return (weight * torch.relu(loss[1] - r)).mean()

    terms = [lf(R(rin))] + [lf(R(e)) for e in extra]
    return sum(terms) / len(terms)


def authors_grad(name, plan, net, ro, R, opts=None, loss="neg"):
    net.zero_grad()
    authors_loss(name, plan, net, ro, R, opts or {}, loss).backward()
    return flat_grad(net)


def explicit_plans(name, n):
    m = fb.get_method(name)
    plans = {
        "full": [{}],
        "draft-k": [{"active": [n - 1]}, {"active": [n - 3, n - 2, n - 1]}, {"active": [n - 4, n - 1]}],
        "draft-lv": [{}, {"noise_seed": 5}],
        "refl": [{"tau": n - 1}, {"tau": 3}],
        "drtune": [{"stop": n - 2, "active": [1, 4, 7]}, {"stop": 5, "active": [5]}],
        "leapalign": [{"k": 0, "j": n - 1}, {"k": 2, "j": 7}, {"k": 5, "j": 6}],
        "flowbp-sparse": [{"active": [0, 4, 9]}, {"active": [9]}],
        "flowbp-bridge": [{"active": [1, 3, 5, 8], "j": 5}, {"active": [0, 9], "j": 9}],
        "flowbp-lagrange": [{"k": 0, "j": 8}, {"k": 2, "j": 6}, {"k": 7, "j": 8}],
    }[name]
    out = [m.plan(n, **p) for p in plans]
    out += [m.plan(n, torch.Generator().manual_seed(s)) for s in (0, 1, 2)]
    return out


@pytest.mark.parametrize("name", fb.METHODS)
def test_streaming_equals_retain_equals_authors(setup, name):
    net, ro, R, _ = setup
    for plan in explicit_plans(name, ro.num_steps):
        g_ret, o_ret = run(net, ro, R, name, plan, "retain")
        g_str, o_str = run(net, ro, R, name, plan, "streaming")
        g_ref = authors_grad(name, plan, net, ro, R)
        assert g_ref.norm() > 0
        assert rel_err(g_str, g_ret) < TOL, plan
        assert rel_err(g_str, g_ref) < TOL, plan
        torch.testing.assert_close(o_str.loss, o_ret.loss, rtol=1e-12, atol=0)
        # bit-exact: both executors compute the weight from the same cached values by the same code
        torch.testing.assert_close(o_str.weight, o_ret.weight, rtol=0, atol=0)


@pytest.mark.parametrize("loss", [("hinge", 1.5), "neg"])
@pytest.mark.parametrize("name", ["flowbp-lagrange", "flowbp-bridge", "refl"])
def test_hinge_loss_and_options(setup, name, loss):
    net, ro, R, _ = setup
    opts = {"alpha": 0.7} if name != "refl" else {"last_n": 3}
    m = fb.get_method(name, **opts)
    plan = m.plan(ro.num_steps, torch.Generator().manual_seed(3))
    g, _ = run(net, ro, R, name, plan, "streaming", loss=loss, **opts)
    ref = authors_grad(name, plan, net, ro, R, opts, loss)
    assert rel_err(g, ref) < TOL


def test_full_backprop_equals_plain_euler_autograd(setup):
    net, ro, R, sig = setup
    n = ro.num_steps
    net.zero_grad()
    x = ro.latent(0)
    for i in range(n):
        x = x + float(sig[i + 1] - sig[i]) * net(x, i)
    (-R(x).mean()).backward()
    ref = flat_grad(net)
    plan = fb.get_method("full").plan(n)
    for ex in fb.EXECUTORS:
        g, _ = run(net, ro, R, "full", plan, ex)
        assert rel_err(g, ref) < TOL


@pytest.mark.parametrize("name", PINNED)
@pytest.mark.parametrize("executor", fb.EXECUTORS)
def test_pinned_reward_sees_exactly_the_sample(setup, name, executor):
    net, ro, _, _ = setup
    R = TinyReward()
    plan = fb.get_method(name).plan(ro.num_steps, torch.Generator().manual_seed(7))
    out = fb.reward_backprop(fb.get_method(name), net, ro, R, plan=plan, executor=executor)
    assert torch.equal(R.calls[0], ro.sample)  # bit-exact: the pin passes the sample's value through
    torch.testing.assert_close(out.reward, R(ro.sample), rtol=0, atol=0)


def _param_vjp(net, x, i, cot):
    v = net(x.detach(), i)
    return torch.cat([g.flatten() for g in torch.autograd.grad(v, list(net.parameters()), cot)])


def _reward_grad(R, x, weight=None):
    x = x.detach().requires_grad_(True)
    w = torch.ones(x.shape[0], dtype=x.dtype) if weight is None else weight
    (g,) = torch.autograd.grad(-(w * R(x)).mean(), x)
    return g


def test_sparse_gradient_is_sum_of_first_order_terms(setup):
    net, ro, R, sig = setup
    n = ro.num_steps
    m = fb.get_method("flowbp-sparse", grad_rescale=0.5)
    plan = m.plan(n, active=[2, 6, 8])
    h = [float(sig[i + 1] - sig[i]) for i in range(n)]
    rho = 1 + 0.5 * (sum(abs(x) for x in h) / sum(abs(h[i]) for i in plan.active) - 1)
    g = _reward_grad(R, ro.sample)
    ref = sum(_param_vjp(net, ro.latent(i), i, rho * h[i] * g) for i in plan.active)
    got, _ = run(net, ro, R, "flowbp-sparse", plan, "streaming", grad_rescale=0.5)
    assert rel_err(got, ref) < TOL


def test_bridge_has_exactly_one_jacobian_factor(setup):
    net, ro, R, sig = setup
    n, alpha = ro.num_steps, 0.4
    m = fb.get_method("flowbp-bridge", alpha=alpha, grad_rescale=0.0)
    plan = m.plan(n, active=[1, 3, 5, 8], j=5)
    h = [float(sig[i + 1] - sig[i]) for i in range(n)]
    g = _reward_grad(R, ro.sample)
    _, jt_g = torch.func.vjp(lambda x: net(x, 5), ro.latent(5))
    (jt_g,) = jt_g(g)
    pre_cot = g + alpha * h[5] * jt_g  # (I + alpha rho h_j J_j)^T g with rho = 1
    ref = sum(_param_vjp(net, ro.latent(i), i, h[i] * pre_cot) for i in (1, 3))
    ref = ref + sum(_param_vjp(net, ro.latent(i), i, h[i] * g) for i in (5, 8))
    for ex in fb.EXECUTORS:
        got, _ = run(net, ro, R, "flowbp-bridge", plan, ex, alpha=alpha, grad_rescale=0.0)
        assert rel_err(got, ref) < TOL


def test_lagrange_has_exactly_one_jacobian_factor(setup):
    net, ro, R, sig = setup
    n, alpha, k, j = ro.num_steps, 0.3, 1, 7
    opts = {"alpha": alpha, "grad_rescale": 0.5}
    plan = fb.get_method("flowbp-lagrange", **opts).plan(n, k=k, j=j)
    _, out = run(net, ro, R, "flowbp-lagrange", plan, "retain", **opts)
    g = _reward_grad(R, ro.sample, out.weight)
    s = ro.sigmas.tolist()
    terms = []
    jt = None
    for a, b in ((j, n), (k, j)):  # leap 2 first: its bridge node defines the Jacobian factor
        nodes = support_nodes(a, b, 3, n)
        w = lagrange_weights([s[q] for q in nodes], s[a], s[b]).tolist()
        rho = 1 + 0.5 * (sum(map(abs, w)) / sum(map(abs, w[:2])) - 1)
        scales = [rho, 0.25 * rho]
        cot = g if a == j else g + jt
        for q in range(2):
            terms.append(_param_vjp(net, ro.latent(nodes[q]), nodes[q], w[q] * scales[q] * cot))
        if a == j:
            _, f = torch.func.vjp(lambda x: net(x, j), ro.latent(j))
            (jt,) = f(alpha * w[0] * rho * g)
    ref = sum(terms)
    got, _ = run(net, ro, R, "flowbp-lagrange", plan, "streaming", **opts)
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("name", ["flowbp-bridge", "full", "flowbp-lagrange", "draft-lv"])
def test_node_contributions_add_up(setup, name):
    net, ro, R, _ = setup
    plan = fb.get_method(name).plan(ro.num_steps, torch.Generator().manual_seed(4))
    net.zero_grad()
    out = fb.reward_backprop(fb.get_method(name), net, ro, R, plan=plan, keep_node_grads=True)
    total = flat_grad(net)
    parts = [torch.cat([g.flatten() for g in vecs]) for vecs in out.diagnostics["node_grads"]]
    assert len(parts) == len(out.diagnostics["nodes"]) == fb.get_method(name).surrogate(plan, ro.sigmas).num_reforwards
    assert rel_err(sum(parts), total) < 1e-12
    for rec, part in zip(out.diagnostics["nodes"], parts):
        assert rec["grad_norm"] == pytest.approx(float(part.norm()), rel=1e-9, abs=1e-300)


def test_diagnostics_and_residuals(setup):
    net, ro, R, _ = setup
    plan = fb.get_method("leapalign").plan(ro.num_steps, k=2, j=7)
    out = fb.reward_backprop(fb.get_method("leapalign"), net, ro, R, plan=plan)
    d = out.diagnostics
    s = ro.sigmas
    xj_hat = ro.latent(2) + float(s[7] - s[2]) * ro.velocity(2)
    x0_hat = ro.latent(7) - float(s[7]) * ro.velocity(7)
    torch.testing.assert_close(d["d_j"], (xj_hat - ro.latent(7)).abs().flatten(1).mean(1))
    torch.testing.assert_close(d["d_0"], (x0_hat - ro.sample).abs().flatten(1).mean(1))
    w = 1 / (d["d_j"].clamp_min(0.1) + d["d_0"].clamp_min(0.1))
    torch.testing.assert_close(out.weight, w)
    assert d["active"] == (2, 7) and d["k"] == 2 and d["j"] == 7
    assert out.reward.shape == (3,) and out.weight.shape == (3,)


def test_gradients_accumulate_and_loss_scale(setup):
    net, ro, R, _ = setup
    m = fb.get_method("flowbp-sparse")
    plan = m.plan(ro.num_steps, active=[3, 9])
    g1, _ = run(net, ro, R, "flowbp-sparse", plan, "streaming")
    fb.reward_backprop(m, net, ro, R, plan=plan)  # accumulates on top of run's gradient
    torch.testing.assert_close(flat_grad(net), 2 * g1)
    net.zero_grad()
    fb.reward_backprop(m, net, ro, R, plan=plan, loss_scale=0.25)
    torch.testing.assert_close(flat_grad(net), 0.25 * g1)


def test_non_finite_loss_raises_before_touching_grads(setup):
    net, ro, _, _ = setup
    bad = lambda x: x.flatten(1).sum(1) * float("nan")
    for ex in fb.EXECUTORS:
        net.zero_grad()
        with pytest.raises(fb.NonFiniteLossError):
            fb.reward_backprop(fb.get_method("flowbp-bridge"), net, ro, bad, executor=ex,
                               generator=torch.Generator().manual_seed(0))
        assert all(p.grad is None for p in net.parameters())


def test_bad_arguments(setup):
    net, ro, R, _ = setup
    m = fb.get_method("flowbp-sparse")
    with pytest.raises(ValueError, match="executor"):
        fb.reward_backprop(m, net, ro, R, executor="fast")
    with pytest.raises(ValueError, match="loss"):
        fb.reward_backprop(m, net, ro, R, loss="mse")
    with pytest.raises(ValueError, match="plan is for 5 steps"):
        fb.reward_backprop(m, net, ro, R, plan=m.plan(5, active=[1]))
    with pytest.raises(ValueError, match="reward_fn must return"):
        fb.reward_backprop(m, net, ro, lambda x: x.sum())
    with pytest.raises(TypeError, match="method"):
        fb.reward_backprop("flowbp-sparse", net, ro, R)


def test_streaming_holds_one_graph_at_a_time():
    """Saved-for-backward bytes of streaming do not grow with the number of active nodes."""
    n = 16
    sig = fb.flow_sigmas(n)
    net = TinyVelocity(sig, hidden=64)
    ro = fb.rollout(net, torch.randn(4, 2, 3, dtype=torch.float64), sig)
    R = TinyReward()

    def peak_saved(active, executor):
        live, peak = [0], [0]

        def pack(t):
            nb = t.numel() * t.element_size()
            live[0] += nb
            peak[0] = max(peak[0], live[0])
            return (t, nb)

        def unpack(p):
            return p[0]

        # count bytes packed since the last backward began; streaming frees each node's graph
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            m = fb.get_method("flowbp-sparse")
            orig = torch.autograd.backward

            def bw(*a, **k):
                r = orig(*a, **k)
                live[0] = 0
                return r

            torch.autograd.backward = bw
            try:
                fb.reward_backprop(m, net, ro, R, plan=m.plan(n, active=active), executor=executor)
            finally:
                torch.autograd.backward = orig
        return peak[0]

    one = peak_saved([n - 1], "streaming")
    many = peak_saved(list(range(n)), "streaming")
    assert many <= 1.1 * one
    assert peak_saved(list(range(n)), "retain") > 4 * peak_saved([n - 1], "retain")


def test_draft_lv_non_finite_copy_leaves_no_gradient(setup):
    """The second re-noised copy's loss is NaN: the first copy's backward must not have run yet (the
    streaming executor checks every copy before the first parameter backward)."""
    net, ro, _, _ = setup
    calls = [0]

    def reward(x):
        calls[0] += 1  # 1: the sample, 2 and 3: the two copies
        r = x.flatten(1).sum(1)
        return r * float("nan") if calls[0] == 3 else r

    m = fb.get_method("draft-lv", num_noised=2)
    for ex in fb.EXECUTORS:
        net.zero_grad(set_to_none=True)
        calls[0] = 0
        with pytest.raises(fb.NonFiniteLossError):
            fb.reward_backprop(m, net, ro, reward, executor=ex, generator=torch.Generator().manual_seed(0))
        assert calls[0] == 3 and all(p.grad is None for p in net.parameters()), ex


class _NaNGrad(torch.autograd.Function):
    """Identity in value, NaN gradient: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def test_non_finite_reward_gradient_leaves_no_gradient(setup):
    net, ro, _, _ = setup
    net.zero_grad(set_to_none=True)
    with pytest.raises(fb.NonFiniteLossError, match="reward's gradient"):
        fb.reward_backprop(fb.get_method("flowbp-sparse"), net, ro, lambda x: _NaNGrad.apply(x).flatten(1).sum(1),
                           executor="streaming", generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in net.parameters())


def test_draft_lv_noise_comes_from_the_rank_generator_and_the_plan_stays_shared(setup):
    """The index sampler's plan is the same on every rank (it draws nothing for DRaFT-LV); the re-noising
    noise is drawn from the generator each rank passes, so two ranks see different noise and the same
    generator state reproduces the same step."""
    net, ro, R, _ = setup
    m = fb.get_method("draft-lv")
    plans = [m.plan(ro.num_steps, torch.Generator().manual_seed(114)) for _ in range(2)]
    assert plans[0] == plans[1] and plans[0].noise_seed is None

    def copies(gen):
        net.zero_grad()
        out = fb.reward_backprop(m, net, ro, R, plan=plans[0], noise_generator=gen)
        return torch.stack(out.diagnostics["renoised_rewards"]), flat_grad(net)

    rank0, g0 = copies(torch.Generator().manual_seed(1))
    rank1, g1 = copies(torch.Generator().manual_seed(1001))
    again, g_again = copies(torch.Generator().manual_seed(1))
    assert not torch.allclose(rank0, rank1) and not torch.allclose(g0, g1)
    # same generator state, same operations in the same order on this machine: bit-identical
    assert torch.equal(rank0, again) and torch.equal(g0, g_again)
    explicit = m.plan(ro.num_steps, noise_seed=3)  # an explicit seed wins over the generator
    outs = [fb.reward_backprop(m, net, ro, R, plan=explicit, noise_generator=torch.Generator().manual_seed(s))
            for s in (1, 2)]
    assert torch.equal(*(torch.stack(o.diagnostics["renoised_rewards"]) for o in outs))
    with pytest.raises(ValueError, match="noise_seed"):
        m.plan(ro.num_steps, noise_seed=-1)
