"""Worker for tests/train/distributed/test_distributed.py, started by torchrun with 2 CPU ranks (gloo).

Runs every check in one launch (starting processes is the slow part) and writes one JSON per rank:
gradient equality of DDP and FSDP2 (full fine-tuning and LoRA) with a single process on the combined
batch, for both executors; the number of gradient reductions issued inside ``no_sync`` (must be 0) and
in total; save with 2 ranks + resume with 2 ranks vs an uninterrupted run; the export gathered from the
shards, reloaded by diffusers' ``from_pretrained``.
"""

import copy
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

import flowbp_kernels as fb
from flowbp_train import distributed as D
from flowbp_train.checkpoint import load_sharded, save_sharded

GLOBAL_B = 4
N = 6


def tiny_model(seed=0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2,
                              num_attention_heads=2, attention_head_dim=8, joint_attention_dim=16,
                              caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=4)
    return m.double()


def data(step, sl):
    g = torch.Generator().manual_seed(100 + step)
    x0 = torch.randn(GLOBAL_B, 1, 8, 8, generator=g, dtype=torch.float64)
    enc = torch.randn(GLOBAL_B, 3, 16, generator=g, dtype=torch.float64)
    pooled = torch.randn(GLOBAL_B, 16, generator=g, dtype=torch.float64)
    return x0[sl], enc[sl], pooled[sl]


def velocity(model, enc, pooled, sig):
    def v(x, i):
        t = torch.full((x.shape[0],), float(sig[i]) * 1000, dtype=x.dtype)
        return model(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample

    return v


def reward(x):
    f = x.flatten(1)
    return torch.tanh(f[:, :20]).sum(1) - 0.05 * (f * f).sum(1)


def step_grads(model, sl, method, plan, executor, no_sync, sig, step=0):
    x0, enc, pooled = data(step, sl)
    vf = velocity(model, enc, pooled, sig)
    ro = fb.rollout(vf, x0, sig)
    out = fb.reward_backprop(method, vf, ro, reward, plan=plan, executor=executor, no_sync=no_sync)
    return out


def flat_grads(model):
    out = []
    for _, p in sorted(D.unwrap(model).named_parameters()):
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None:
            g = torch.zeros(p.shape, dtype=p.dtype)
        elif hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out.append(g.flatten())
    return torch.cat(out)


def add_lora(model):
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return model


class Counter:
    """Counts gradient reductions, and how many happen while a no_sync context is open."""

    def __init__(self):
        self.total = self.inside = 0
        self.open = False

    def wrap_no_sync(self, fn):
        if fn is None:
            return None
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.open = True
            try:
                with fn():
                    yield
            finally:
                self.open = False

        return ctx

    def hit(self):
        self.total += 1
        self.inside += int(self.open)


def main(out_dir):
    state = D.init_distributed("cpu")
    r, w = state.rank, state.world_size
    assert w == 2, w
    per = GLOBAL_B // w
    sl = slice(r * per, (r + 1) * per)
    sig = fb.flow_sigmas(N, shift=3.0)
    res = {"rank": r, "world_size": w, "grads": [], "counts": []}

    # ---- collective counting hooks
    counter = Counter()
    orig_rs, orig_ar = dist.reduce_scatter_tensor, dist.all_reduce
    orig_rss = getattr(dist, "reduce_scatter_single", None)

    def rs(*a, **k):
        counter.hit()
        return orig_rs(*a, **k)

    def rss(*a, **k):
        counter.hit()
        return orig_rss(*a, **k)

    def ar(*a, **k):
        counter.hit()
        return orig_ar(*a, **k)

    dist.reduce_scatter_tensor, dist.all_reduce = rs, ar
    if orig_rss is not None:  # FSDP2's reduce-scatter entry point in torch >= 2.10
        dist.reduce_scatter_single = rss

    def ddp_hook(state_, bucket):
        counter.hit()
        t = bucket.buffer().div_(w)
        return orig_ar(t, async_op=True).get_future().then(lambda f: f.value()[0])

    # ---- gradient equality
    for lora in (False, True):
        base = tiny_model()
        if lora:
            base = add_lora(base)
        for name, kw in (("flowbp-lagrange", {"k": 1, "j": 4}), ("flowbp-bridge", {"active": [0, 2, 3, 5], "j": 3}),
                         ("full", {}), ("draft-lv", {"noise_seed": 7})):  # draft-lv: the copies' graphs live together
            method = fb.get_method(name)
            plan = method.plan(N, torch.Generator().manual_seed(0), **kw)
            ref_model = copy.deepcopy(base)
            if name == "draft-lv":
                # each rank re-noises its own slice from the plan's seed, so the single-process reference
                # is the mean of the per-slice gradients (what DDP and FSDP2 average), not the combined batch
                for q in range(w):
                    step_grads(ref_model, slice(q * per, (q + 1) * per), method, plan, "streaming", None, sig)
                ref = flat_grads(ref_model) / w
            else:
                step_grads(ref_model, slice(0, GLOBAL_B), method, plan, "streaming", None, sig)
                ref = flat_grads(ref_model)
            for strategy in ("ddp", "fsdp2"):
                for executor in fb.EXECUTORS:
                    model = D.wrap_model(copy.deepcopy(base), strategy, state)
                    if strategy == "ddp":
                        model.register_comm_hook(None, ddp_hook)
                    counter.total = counter.inside = 0
                    ns = counter.wrap_no_sync(D.no_sync_context(model, strategy, state))
                    step_grads(model, sl, method, plan, executor, ns, sig)
                    got = flat_grads(model)
                    err = float((got - ref).norm() / ref.norm())
                    res["grads"].append({"lora": lora, "method": name, "strategy": strategy, "executor": executor,
                                         "rel_err": err, "reductions": counter.total,
                                         "reductions_inside_no_sync": counter.inside,
                                         "nodes": method.surrogate(plan, sig).num_reforwards})

    # ---- save with 2 ranks, resume with 2 ranks
    def train(strategy, steps, model=None, opt=None, start=0):
        if model is None:
            model = D.wrap_model(tiny_model(), strategy, state)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        method = fb.get_method("flowbp-sparse")
        losses = []
        for s in range(start, start + steps):
            opt.zero_grad(set_to_none=True)
            plan = method.plan(N, torch.Generator().manual_seed(s))
            out = step_grads(model, sl, method, plan, "streaming", D.no_sync_context(model, strategy, state), sig, s)
            loss = out.loss.clone()
            dist.all_reduce(loss)
            losses.append(float(loss) / w)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return losses, model, opt

    tmp = tempfile.mkdtemp(prefix=f"flowbp-dist-{r}-") if r == 0 else None
    holder = [tmp]
    dist.broadcast_object_list(holder, src=0)
    tmp = holder[0]
    for strategy in ("ddp", "fsdp2"):
        full, _, _ = train(strategy, 4)
        first, model, opt = train(strategy, 2)
        ckpt = os.path.join(tmp, f"ckpt-{strategy}")
        save_sharded(ckpt, model, opt)
        model2 = D.wrap_model(tiny_model(seed=5), strategy, state)  # different init: must be overwritten
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
        load_sharded(ckpt, model2, opt2)
        second, model2, _ = train(strategy, 2, model2, opt2, start=2)
        res[f"resume_{strategy}"] = {"uninterrupted": full, "resumed": first + second}

        # ---- export gathered from the shards, reloaded by diffusers
        sd = D.full_state_dict(model2)
        x0, enc, pooled = data(0, slice(0, 1))
        t = torch.full((1,), 300.0, dtype=torch.float64)
        with torch.no_grad():
            y = model2(hidden_states=x0, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample
        if r == 0:
            from diffusers import SD3Transformer2DModel

            plain = tiny_model(seed=9)
            plain.load_state_dict(sd)
            folder = os.path.join(tmp, f"export-{strategy}")
            plain.save_pretrained(folder)
            loaded = SD3Transformer2DModel.from_pretrained(folder, torch_dtype=torch.float64)
            with torch.no_grad():
                y2 = loaded(hidden_states=x0, encoder_hidden_states=enc, pooled_projections=pooled,
                            timestep=t).sample
            loaded_sd = loaded.state_dict()
            res[f"export_{strategy}"] = {
                "max_diff": float((y - y2).abs().max()), "magnitude": float(y.abs().max()),
                "weights_equal": sd.keys() == loaded_sd.keys() and all(torch.equal(sd[k], loaded_sd[k]) for k in sd)}
        dist.barrier()

    dist.reduce_scatter_tensor, dist.all_reduce = orig_rs, orig_ar
    if orig_rss is not None:
        dist.reduce_scatter_single = orig_rss
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as f:
        json.dump(res, f, indent=1)
    D.cleanup()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
