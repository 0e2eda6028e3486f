"""Adapters against diffusers: the adapter's rollout + decode reproduces the family's own pipeline
(same noise, schedule, guidance, decoding), CFG gradients follow the detach rule, and a model id that
cannot be reached fails fast with instructions."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from flowbp_kernels import rollout

from helpers.pipelines import tiny_adapter

N = 4


def _pipeline_image(ad, batch, noise):
    """The pipeline's own sampler on the same inputs (it is the independent reference)."""
    pipe, fam = ad.pipeline, ad.family
    common = dict(num_inference_steps=N, output_type="np", height=ad.resolution, width=ad.resolution,
                  guidance_scale=ad.guidance_scale, latents=noise.clone())
    t = batch.tensors
    if fam == "flux1":
        out = pipe(prompt_embeds=t["encoder_hidden_states"], pooled_prompt_embeds=t["pooled_projections"], **common)
    elif fam == "qwen-image":  # true CFG with the adapter's negative prompt embeddings and masks
        n = batch.negative
        out = pipe(prompt_embeds=t["encoder_hidden_states"], prompt_embeds_mask=t["encoder_hidden_states_mask"],
                   negative_prompt_embeds=n["encoder_hidden_states"],
                   negative_prompt_embeds_mask=n["encoder_hidden_states_mask"], true_cfg_scale=ad.guidance_scale,
                   **{**common, "guidance_scale": None})
    elif fam in ("sd3", "sd3-large"):
        out = pipe(prompt_embeds=t["encoder_hidden_states"], pooled_prompt_embeds=t["pooled_projections"],
                   negative_prompt_embeds=batch.negative["encoder_hidden_states"],
                   negative_pooled_prompt_embeds=batch.negative["pooled_projections"],
                   sigmas=np.linspace(1.0, 1 / N, N).tolist(), **common)
    elif fam == "flux2-dev":  # embedded guidance, one branch; latents before packing as Klein's
        b, n, c = noise.shape
        common["latents"] = noise.permute(0, 2, 1).reshape(b, c, ad.side, ad.side).clone()
        out = pipe(prompt_embeds=t["encoder_hidden_states"], **common)
    elif fam == "z-image":
        out = _zimage_pipeline_call(pipe, batch, common)
    else:  # FLUX.2 takes the latents before packing: [B, 128, H/16, W/16]
        b, n, c = noise.shape
        common["latents"] = noise.permute(0, 2, 1).reshape(b, c, ad.side, ad.side).clone()
        out = pipe(prompt_embeds=t["encoder_hidden_states"], negative_prompt_embeds=batch.negative[
            "encoder_hidden_states"], **common)
    return torch.from_numpy(out.images).permute(0, 3, 1, 2)


def _zimage_pipeline_call(pipe, batch, common):
    """ZImagePipeline takes prompt embeddings as one [L_i, D] tensor per prompt (its padding removed)."""
    def unpadded(t):
        return [e[m.bool()] for e, m in zip(t["encoder_hidden_states"], t["attention_mask"])]

    return pipe(prompt_embeds=unpadded(batch.tensors), negative_prompt_embeds=unpadded(batch.negative), **common)


@pytest.mark.parametrize("family", ["flux1", "sd3", "flux2", "flux2-dev", "z-image", "sd3-large", "qwen-image"])
def test_rollout_and_decode_match_the_diffusers_pipeline(family):
    ad = tiny_adapter(family)
    batch = ad.encode_prompts(["a cat", "a red bus"])
    noise = ad.initial_noise(2, generator=torch.Generator().manual_seed(3))
    sig = ad.sigmas(N)
    with torch.no_grad():
        ours = ad.decode(rollout(ad.velocity_fn(batch, sig), noise, sig).sample)
    ref = _pipeline_image(ad, batch, noise)
    assert ours.shape == ref.shape == (2, 3, 16, 16)
    # both in fp32; the pipeline's scheduler sums the Euler steps in a different order
    assert torch.allclose(ours, ref, atol=2e-5), float((ours - ref).abs().max())


@pytest.mark.parametrize("family", ["sd3", "flux2", "z-image"])
def test_negative_branch_has_no_gradient_unless_asked(family):
    ad = tiny_adapter(family)
    batch = ad.encode_prompts(["a cat"])
    sig = ad.sigmas(N)
    x = ad.initial_noise(1, generator=torch.Generator().manual_seed(0))
    params = [p for p in ad.transformer.parameters()]
    g = ad.cfg_multiplier  # the guidance scale, but for Z-Image's v_c + g (v_c - v_u): 1 + g

    def grads(fn):
        return torch.autograd.grad(fn().square().sum(), params, allow_unused=True)

    def cond_only():  # the conditional branch alone, for the independent expression below
        return ad.velocity_fn(type(batch)(batch.prompts, batch.tensors, None), sig)(x, 1)

    v_full = ad.velocity_fn(batch, sig)(x, 1).detach()
    v_neg = ad.velocity_fn(type(batch)(batch.prompts, batch.negative, None), sig)(x, 1).detach()
    v_cond = cond_only().detach()
    assert torch.allclose(v_full, v_neg + g * (v_cond - v_neg), atol=1e-5)
    # d/dθ |v|^2 with a detached negative branch = 2 g <v, dv_cond/dθ>
    got = grads(lambda: ad.velocity_fn(batch, sig)(x, 1))
    want = torch.autograd.grad((cond_only() * (2 * g * v_full)).sum() / 2, params, allow_unused=True)
    for a, b in zip(got, want):
        if b is not None:
            assert torch.allclose(a / 2, b, atol=1e-5, rtol=1e-4)
    with_neg = grads(lambda: ad.velocity_fn(batch, sig, grad_negative=True)(x, 1))
    assert any(not torch.allclose(a, b) for a, b in zip(got, with_neg) if a is not None and b is not None)


def test_unreachable_model_id_fails_fast_with_instructions():
    from flowbp_train.models import build_adapter

    t0 = time.perf_counter()
    with pytest.raises(OSError, match="--local-dir DIR"):
        build_adapter("flux1", "black-forest-labs/FLUX.1-dev-not-cached", local_files_only=True)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(FileNotFoundError, match="local folder not found"):
        build_adapter("sd3", "/no/such/folder")
    with pytest.raises(ValueError, match="unknown model family"):
        build_adapter("sdxl", "/x")


def test_sd3_schedule_is_the_authors_and_differs_from_the_pipeline_default_as_stated():
    """The README's exception: the SD3 adapter's sigmas are linspace(1, 1/N, N) shifted by 3 (the authors',
    and what the pipeline computes when given those sigmas); StableDiffusion3Pipeline's own default ends at
    about 0.009 instead of 3 / (N + 2)."""
    ad = tiny_adapter("sd3")
    sched = ad.pipeline.scheduler
    ours = ad.sigmas(N).double()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N).tolist())
    assert torch.allclose(sched.sigmas.double(), ours, atol=1e-6)  # the scheduler keeps sigmas in fp32
    assert float(ours[N - 1]) == pytest.approx(3 / (N + 2))
    sched.set_timesteps(N)  # the pipeline's default (no sigmas passed)
    default = sched.sigmas.double()
    assert float(default[N - 1]) == pytest.approx(0.009, abs=1e-3)
    assert float((default - ours).abs().max()) > 0.1


@pytest.mark.parametrize("distilled", [False, True])
def test_flux2_follows_the_pipeline_is_distilled(distilled):
    """A distilled FLUX.2 config turns CFG off (no negative branch), as Flux2KleinPipeline does, and the
    adapter still reproduces the pipeline's image."""
    from flowbp_train.models.flux2 import Flux2Adapter

    from helpers.pipelines import PIPELINES, RESOLUTION, prompt_encoder

    pipe = PIPELINES["flux2"](0)
    pipe.register_to_config(is_distilled=distilled)
    ad = Flux2Adapter(pipe, resolution=RESOLUTION, prompt_encoder=prompt_encoder(pooled=False))
    assert ad.is_distilled is distilled and ad.uses_cfg is not distilled and ad.guidance_scale == 4.0
    batch = ad.encode_prompts(["a cat"])
    assert (batch.negative is None) is distilled
    noise = ad.initial_noise(1, generator=torch.Generator().manual_seed(3))
    sig = ad.sigmas(N)
    with torch.no_grad():
        ours = ad.decode(rollout(ad.velocity_fn(batch, sig), noise, sig).sample)
    b, n, c = noise.shape
    neg = {} if distilled else {"negative_prompt_embeds": batch.negative["encoder_hidden_states"]}
    ref = pipe(prompt_embeds=batch.tensors["encoder_hidden_states"], num_inference_steps=N, output_type="np",
               height=RESOLUTION, width=RESOLUTION, guidance_scale=4.0,
               latents=noise.permute(0, 2, 1).reshape(b, c, ad.side, ad.side).clone(), **neg).images
    assert torch.allclose(ours, torch.from_numpy(ref).permute(0, 3, 1, 2), atol=2e-5)


def test_qwen_image_true_cfg_rescales_to_the_conditional_norm_and_detaches_the_negative():
    """Qwen-Image's guided velocity is ``c * |v_cond| / |c|`` per token, ``c = v_neg + g (v_cond - v_neg)``
    (QwenImagePipeline's true CFG); its gradient flows through the conditional branch only unless
    ``grad_negative``; the schedule is the scheduler's (dynamic shift, then the terminal stretch)."""
    ad = tiny_adapter("qwen-image")
    batch = ad.encode_prompts(["a cat", "a red bus"])
    assert batch.negative is not None and ad.guidance_scale == 4.0 and ad.negative_prompt == " "
    sig = ad.sigmas(N)
    sched = ad.pipeline.scheduler
    mu = ad.pipeline.scheduler.config  # the pipeline's mu for this sequence length, computed here in float64
    mu = mu.base_shift + (mu.max_shift - mu.base_shift) * (ad.side ** 2 - mu.base_image_seq_len) / (
        mu.max_image_seq_len - mu.base_image_seq_len)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / N, N).tolist(), mu=mu)
    assert torch.allclose(sched.sigmas.double(), sig, atol=1e-6) and float(sig[N - 1]) == pytest.approx(0.02)
    x = ad.initial_noise(2, generator=torch.Generator().manual_seed(0))
    params = list(ad.transformer.parameters())

    def branch(tensors, z):
        return ad.velocity_fn(type(batch)(batch.prompts, tensors, None), sig)(z, 1)

    v = ad.velocity_fn(batch, sig)(x, 1)
    v_cond, v_neg = branch(batch.tensors, x), branch(batch.negative, x).detach()
    c = v_neg + ad.guidance_scale * (v_cond - v_neg)
    want = c * (v_cond.norm(dim=-1, keepdim=True) / c.norm(dim=-1, keepdim=True))
    assert torch.allclose(v, want, atol=1e-6)  # fp32, the same operations on the same inputs
    got = torch.autograd.grad(v.square().sum(), params, allow_unused=True)
    ref = torch.autograd.grad(want.square().sum(), params, allow_unused=True)
    for a, b in zip(got, ref):
        if b is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    full = torch.autograd.grad(ad.velocity_fn(batch, sig, grad_negative=True)(x, 1).square().sum(), params,
                               allow_unused=True)
    assert any(not torch.allclose(a, b) for a, b in zip(got, full) if a is not None and b is not None)
    with pytest.raises(ValueError, match=r"max_sequence_length must be in \[1, 1024\]"):
        tiny_adapter("qwen-image", max_sequence_length=2048)  # the pipeline's own limit


@pytest.mark.parametrize("family", ["flux2-dev", "z-image"])
def test_fsdp2_shards_every_block_of_the_added_families(family):
    """The blocks FSDP2 wraps one by one (``distributed._blocks``): every block class of the transformer,
    Z-Image's refiner blocks included (the 2-rank CPU run of tests/train/distributed uses SD3 only)."""
    from flowbp_train.distributed import _blocks

    tr = tiny_adapter(family).transformer
    found = {id(b) for b in _blocks(tr)}
    classes = {"flux2-dev": ("Flux2TransformerBlock", "Flux2SingleTransformerBlock"),
               "z-image": ("ZImageTransformerBlock",)}[family]
    blocks = [m for m in tr.modules() if type(m).__name__ in classes]
    assert blocks and {id(b) for b in blocks} == found


@pytest.mark.parametrize("given_encoder", [False, True])
def test_encode_all_parks_the_model_while_the_text_encoders_encode(monkeypatch, given_encoder):
    """The setup's prompt encoding: the transformer and the VAE leave the device before the first text
    encoder is placed and come back after the encoders are offloaded, so the device never holds both
    (a given prompt encoder places nothing: the model stays where it is)."""
    from flowbp_train.models import base

    ad = tiny_adapter("sd3")
    calls: list[str] = []
    encode, given = ad._encode, ad.prompt_encoder

    def encode_with_the_given(prompts):  # the tiny pipeline has no tokenizers: its prompt encoder encodes
        calls.append("encode")
        with monkeypatch.context() as m:
            m.setattr(ad, "prompt_encoder", given)
            return encode(prompts)

    monkeypatch.setattr(ad, "text_encoders", lambda: [torch.nn.Linear(2, 2)])
    monkeypatch.setattr(ad, "_encode", encode_with_the_given)
    monkeypatch.setattr(base, "place_text_encoder", lambda m, d, t: calls.append("place") or m)
    monkeypatch.setattr(base, "release_cached_device_memory", lambda device: calls.append("release"))
    for name in ("park_on_host", "unpark", "offload_text_encoders"):
        orig = getattr(ad, name)
        monkeypatch.setattr(ad, name, lambda n=name, f=orig: calls.append(n) or f())
    if not given_encoder:  # as with the pipeline's own encoders (placed by _encode_cached)
        monkeypatch.setattr(ad, "prompt_encoder", None)
    ad.encode_all(["a cat", "a dog", "a bus"], 2)
    # two chunks; the first also encodes SD3's empty negative prompt (three encodes, each after a placement)
    if given_encoder:
        assert calls == ["encode"] * 3 + ["offload_text_encoders"]
    else:
        # the allocator's cache is emptied between the encoders leaving and the model coming back
        assert calls == ["park_on_host", *["place", "encode"] * 3, "offload_text_encoders", "release", "unpark"]
    assert {p.device.type for m in ad.placed_modules() for p in m.parameters()} == {"cpu"}
    assert ad.placed_modules() == [ad.transformer, ad.vae]
