"""The miniature adapter: CFG math, gradient routing, exact re-forwards, decode, LoRA round trip."""

from __future__ import annotations

import pytest
import torch

from flowbp_kernels import rollout
from flowbp_train.models.mini import MiniAdapter


def add_lora(transformer: torch.nn.Module, rank: int, targets, seed: int) -> list[torch.nn.Parameter]:
    """A peft LoRA (alpha = rank, B initialised to zero, A from ``seed``); its parameters, trainable."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=True))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


@pytest.fixture()
def adapter():
    return MiniAdapter.from_pretrained("mini", guidance_scale=2.5)


@pytest.fixture()
def adapter64():
    return MiniAdapter.from_pretrained("mini", guidance_scale=2.5, dtype=torch.float64)


def _raw(ad, x, cond, sigma):
    """The transformer called directly, as diffusers' SD3 pipeline does (timestep = 1000 sigma)."""
    t = torch.full((x.shape[0],), sigma * 1000.0, dtype=ad.dtype)
    enc = cond["encoder_hidden_states"].to(ad.dtype)
    return ad.transformer(hidden_states=x.to(ad.dtype), encoder_hidden_states=enc,
                          pooled_projections=cond["pooled_projections"].to(ad.dtype), timestep=t).sample


def test_cfg_combination_and_negative_branch_gradient(adapter64):
    adapter = adapter64
    params = add_lora(adapter.transformer, 4, adapter.default_lora_targets, seed=0)
    with torch.no_grad():
        for p in params:  # non-zero B so the LoRA changes the output
            p.normal_(0, 0.05)
    prompts = ["a handwritten digit three", "digit seven"]
    batch = adapter.encode_prompts(prompts)
    # the negative branch is the null prompt's encoding
    null = adapter.text_encoder.encode([""])[1].expand(2, -1)
    # bit-exact: the same encoder call on the same prompt in this process
    torch.testing.assert_close(batch.negative["pooled_projections"], null, rtol=0, atol=0)
    sig = adapter.sigmas(10)
    x = adapter.initial_noise(2, torch.Generator().manual_seed(0))
    vc, vn = _raw(adapter, x, batch.tensors, float(sig[3])), _raw(adapter, x, batch.negative, float(sig[3]))
    v = adapter.velocity_fn(batch, sig)(x, 3)
    torch.testing.assert_close(v, vn + 2.5 * (vc - vn), rtol=0, atol=1e-12)

    # gradient: negative branch detached by default -> d sum(v) = g d sum(v_cond)
    def grads(fn):
        for p in params:
            p.grad = None
        fn().sum().backward()
        return torch.cat([p.grad.flatten() for p in params])

    g_default = grads(lambda: adapter.velocity_fn(batch, sig)(x, 3))
    g_cond = grads(lambda: _raw(adapter, x, batch.tensors, float(sig[3])))
    g_neg = grads(lambda: _raw(adapter, x, batch.negative, float(sig[3])))
    g_full = grads(lambda: adapter.velocity_fn(batch, sig, grad_negative=True)(x, 3))
    torch.testing.assert_close(g_default, 2.5 * g_cond, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_full, 2.5 * g_cond - 1.5 * g_neg, rtol=1e-10, atol=1e-12)


def test_reforward_reproduces_rollout_exactly(adapter):
    batch = adapter.encode_prompts(["digit one", "a drawn number nine", "the handwritten digit zero"])
    sig = adapter.sigmas(6)
    vf = adapter.velocity_fn(batch, sig)
    ro = rollout(vf, adapter.initial_noise(3, torch.Generator().manual_seed(1)), sig)
    for i in (0, 3, 5):
        with torch.enable_grad():
            # bit-exact: the rollout's own call repeated on the cached input, in this process
            assert torch.equal(vf(ro.cache.latent(i), i), ro.velocity(i))


def test_decode_straight_through_clamp(adapter):
    x = torch.tensor([-1.5, -1.0, 0.0, 0.6, 1.4], dtype=torch.float64).view(1, 1, 1, 5).requires_grad_(True)
    y = adapter.decode(x)
    assert y.shape == (1, 3, 1, 5)
    torch.testing.assert_close(y[0, 0, 0].detach(), torch.tensor([0.0, 0.0, 0.5, 0.8, 1.0], dtype=torch.float64))
    y[:, 0].sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 0.5))  # d((x + 1) / 2)/dx, also where clamped
    with pytest.raises(ValueError, match="latents"):
        adapter.decode(torch.zeros(1, 3, 16, 16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="guidance_scale"):
        MiniAdapter.from_pretrained("mini", guidance_scale=0.0)
    with pytest.raises(ValueError, match="resolution"):
        MiniAdapter.from_pretrained("mini", resolution=512)
    ad = MiniAdapter.from_pretrained("mini")
    with pytest.raises(ValueError, match="batch_size"):
        ad.initial_noise(0)
    with pytest.raises(TypeError, match="prompts"):
        ad.encode_prompts("digit one")
    with pytest.raises(TypeError, match="batch"):
        ad.velocity_fn(["digit one"], ad.sigmas(4))


def test_lora_save_load_round_trip(tmp_path):
    from peft.utils import get_peft_model_state_dict

    a = MiniAdapter.from_pretrained("mini")
    params = add_lora(a.transformer, 4, a.default_lora_targets, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    a.save_lora_weights(tmp_path, get_peft_model_state_dict(a.transformer))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    b = MiniAdapter.from_pretrained("mini")
    b.load_lora_weights(path)
    batch_a, batch_b = a.encode_prompts(["digit four"]), b.encode_prompts(["digit four"])
    x = a.initial_noise(1, torch.Generator().manual_seed(2))
    sig = a.sigmas(4)
    with torch.no_grad():
        va, vb = a.velocity_fn(batch_a, sig)(x, 1), b.velocity_fn(batch_b, sig)(x, 1)
        base = MiniAdapter.from_pretrained("mini")
        v0 = base.velocity_fn(base.encode_prompts(["digit four"]), sig)(x, 1)
    assert torch.equal(va, vb)  # bit-exact: identical weights (a file round trip), same calls
    assert not torch.allclose(va, v0)  # the LoRA does change the output


def test_lora_trained_with_alpha_not_rank_reloads_at_its_scale(tmp_path):
    """rank 4, lora_alpha 16 (scale 4, as trained by flowbp-train with lora_alpha != rank): the file's
    metadata brings the scale back in the miniature's loader (``flowbp-mini sample --lora``, ``report``) and
    in flowbp-eval's (``--lora``)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from flowbp_train.evaluate import _load_lora

    trained = MiniAdapter.from_pretrained("mini")
    trained.transformer.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=list(trained.default_lora_targets)))
    with torch.no_grad():
        for n, p in trained.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    trained.save_lora_weights(tmp_path, get_peft_model_state_dict(trained.transformer), lora_alpha=16)
    batch = trained.encode_prompts(["digit seven"])
    sig = trained.sigmas(4)
    x = trained.initial_noise(1, generator=torch.Generator().manual_seed(0))

    def velocity(ad):
        with torch.no_grad():
            return ad.velocity_fn(batch, sig)(x, 1)

    base, want = velocity(MiniAdapter.from_pretrained("mini")), velocity(trained)
    assert (want - base).abs().max() > 1e-3
    by_mini, by_eval = MiniAdapter.from_pretrained("mini"), MiniAdapter.from_pretrained("mini")
    by_mini.load_lora_weights(tmp_path)
    assert _load_lora(by_eval, str(tmp_path))["lora_alpha"] == 16
    for ad in (by_mini, by_eval):  # fp32, the same layers: rounding only
        assert torch.allclose(velocity(ad), want, atol=1e-6)
