"""The five rewards on tiny random-weight models of their architectures (built from configs, offline).

For each: gradients reach every image, scores are per-sample, the value equals an independent
computation with the model's own forward on the same pixels (float32, rtol 1e-4), and image features
from our tensor preprocessing agree with those from the reference PIL processor within FEATURE_RTOL.
FEATURE_RTOL: the pixel difference is <= 8/255 at a few edge pixels and ~0.3/255 on average
(test_preprocess.py); through these 2-layer random towers it was measured at 0.14% (CLIP) and 0.06%
(HPSv2) of the feature norm, while two different test images differ by >= 16%; asserted: 2%, and at most
a quarter of that distance.
Loading a real id without network or local weights fails fast, naming the file and the option.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_train.rewards.aesthetic import AestheticMLP, AestheticReward
from flowbp_train.rewards.clipscore import CLIPScoreReward
from flowbp_train.rewards.hpsv2 import HPSv2Reward
from flowbp_train.rewards.imagereward import ImageRewardReward
from flowbp_train.rewards.pickscore import PickScoreReward

from helpers.images import synthetic_image, to_tensor
from helpers.reward_models import TinyImageReward, ToyTokenizer, tiny_clip, tiny_open_clip

HAS_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None
FEATURE_RTOL = 0.02
PROMPTS = ["a red fox in the snow", "a bowl of fruit", "a red fox in the snow"]


def _images(shape=(200, 300)):
    return to_tensor([synthetic_image(*shape, seed=s) for s in range(3)])


def build(name):
    torch.manual_seed(0)
    if name == "pickscore":
        return PickScoreReward(model=tiny_clip(), tokenizer=ToyTokenizer())
    if name == "clipscore":
        return CLIPScoreReward(model=tiny_clip(), tokenizer=ToyTokenizer(), w=2.5)
    if name == "aesthetic":
        mlp = AestheticMLP(input_size=16)
        return AestheticReward(model=tiny_clip(), mlp=mlp)
    if name == "imagereward":
        return ImageRewardReward(model=TinyImageReward())
    if name == "hpsv2":
        if not HAS_OPEN_CLIP:
            pytest.skip("open_clip (with torchvision) is not installed; run with the open_clip environment")
        model, tok = tiny_open_clip()
        return HPSv2Reward(model=model, tokenizer=tok)
    raise AssertionError(name)


NAMES = ["pickscore", "clipscore", "aesthetic", "imagereward", "hpsv2"]


@pytest.mark.parametrize("name", NAMES)
def test_gradient_reaches_every_image(name):
    r = build(name)
    assert r.differentiable and not r.training and not any(p.requires_grad for p in r.parameters())
    x = _images().requires_grad_(True)
    s = r.score(x, PROMPTS)
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    s.sum().backward()
    per_image = x.grad.abs().flatten(1).sum(1)
    assert torch.isfinite(x.grad).all() and (per_image > 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_scores_are_per_sample(name):
    r = build(name)
    x = _images()
    with torch.no_grad():
        base = r.score(x, PROMPTS)
        y = x.clone()
        y[1] = to_tensor([synthetic_image(200, 300, seed=99)])[0]
        changed = r.score(y, PROMPTS)
    torch.testing.assert_close(changed[[0, 2]], base[[0, 2]], rtol=1e-5, atol=1e-6)
    assert (changed[1] - base[1]).abs() > 1e-6


def _clip_reference(r, pixels, prompts):
    """Image and text embeddings from CLIPModel's own get_*_features, normalised (float64)."""
    m = r.model
    tok = ToyTokenizer()(prompts, max_length=r.max_text_tokens)
    img = m.get_image_features(pixel_values=pixels).pooler_output.double()
    txt = m.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
    txt = txt.double()
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


@torch.no_grad()
def test_values_match_model_forward():
    x = _images()
    # PickScore: CLIPModel.forward's logits_per_image diagonal is logit_scale.exp() * cos.
    r = build("pickscore")
    pix = r.preprocess(x)
    tok = ToyTokenizer()(PROMPTS, max_length=r.max_text_tokens)
    ref = r.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix)
    torch.testing.assert_close(r.score(x, PROMPTS), ref.logits_per_image.diagonal(), rtol=1e-4, atol=1e-5)
    # CLIPScore: 2.5 * max(cos, 0).
    r = build("clipscore")
    img, txt = _clip_reference(r, r.preprocess(x), PROMPTS)
    ref = 2.5 * (img * txt).sum(-1).clamp_min(0)
    torch.testing.assert_close(r.score(x, PROMPTS).double(), ref, rtol=1e-4, atol=1e-5)
    # Aesthetic: the MLP on normalised image features.
    r = build("aesthetic")
    img, _ = _clip_reference(r, r.preprocess(x), PROMPTS)
    ref = r.mlp.double()(img).squeeze(-1)
    r.mlp.float()
    torch.testing.assert_close(r.score(x, PROMPTS).double(), ref, rtol=1e-4, atol=1e-5)
    # ImageReward: the package's scoring recipe written out (text cross-attends to the image tokens).
    r = build("imagereward")
    m = r.model
    tok = m.blip.tokenizer(PROMPTS, max_length=35)
    emb = m.blip.visual_encoder(r.preprocess(x))
    out = m.blip.text_encoder(tok["input_ids"], attention_mask=tok["attention_mask"], encoder_hidden_states=emb,
                              encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long))
    ref = (m.mlp(out.last_hidden_state[:, 0]).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(r.score(x, PROMPTS), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip (with torchvision) is not installed")
@torch.no_grad()
def test_hpsv2_value_matches_open_clip_forward():
    r = build("hpsv2")
    x = _images()
    out = r.model(r.preprocess(x), r.tokenizer(PROMPTS))
    img, txt = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
    torch.testing.assert_close(r.score(x, PROMPTS), (img * txt).sum(-1), rtol=1e-4, atol=1e-5)


def _relative_feature_errors(embed, ref_pixels_fn, shapes):
    errs, dists = [], []
    feats_ref = []
    for k, hw in enumerate(shapes):
        img = synthetic_image(*hw, seed=50 + k)
        ours = embed(to_tensor([img]), None)
        ref = embed(None, ref_pixels_fn(img))
        errs.append(float((ours - ref).norm() / ref.norm()))
        feats_ref.append(ref)
    for a, b in zip(feats_ref, feats_ref[1:]):
        dists.append(float((a - b).norm() / a.norm()))
    return max(errs), min(dists)


SHAPES = [(256, 256), (300, 200), (177, 411), (512, 384), (96, 200)]


@torch.no_grad()
def test_clip_features_match_reference_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    r = build("pickscore")
    proc = CLIPImageProcessorPil()

    def embed(x, pixels):
        if pixels is None:
            pixels = r.preprocess(x)
        return r.model.get_image_features(pixel_values=pixels).pooler_output[0]

    err, dist = _relative_feature_errors(
        embed, lambda img: proc(images=Image.fromarray(img), return_tensors="pt").pixel_values, SHAPES)
    assert err <= FEATURE_RTOL and err <= dist / 4


@pytest.mark.skipif(not HAS_OPEN_CLIP, reason="open_clip (with torchvision) is not installed")
@torch.no_grad()
def test_hpsv2_features_match_open_clip_transform():
    from open_clip.transform import image_transform

    r = build("hpsv2")
    tf = image_transform(224, is_train=False, resize_mode="longest")

    def embed(x, pixels):
        if pixels is None:
            pixels = r.preprocess(x)
        return r.model.encode_image(pixels)[0]

    err, dist = _relative_feature_errors(embed, lambda img: tf(Image.fromarray(img))[None], SHAPES)
    assert err <= FEATURE_RTOL and err <= dist / 4


def _cached(repo, filename):
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.parametrize("factory,needle,option,cached", [
    (lambda: HPSv2Reward(), "HPS_v2.1_compressed.pt", "checkpoint_path", ("xswu/HPSv2", "HPS_v2.1_compressed.pt")),
    (lambda: PickScoreReward(), "yuvalkirstain/PickScore_v1", "model_path",
     ("yuvalkirstain/PickScore_v1", "config.json")),
    (lambda: CLIPScoreReward(), "openai/clip-vit-large-patch14", "model_path",
     ("openai/clip-vit-large-patch14", "config.json")),
    (lambda: AestheticReward(), "sac+logos+ava1-l14-linearMSE.pth", "mlp_path", None),
    (lambda: ImageRewardReward(), "ImageReward.pt", "checkpoint_path", ("THUDM/ImageReward", "ImageReward.pt")),
    (lambda: HPSv2Reward("/nonexistent/dir/HPS_v2.1_compressed.pt"), "/nonexistent", "checkpoint_path", None),
])
def test_missing_weights_fail_fast(monkeypatch, factory, needle, option, cached):
    if cached is not None and _cached(*cached):
        pytest.skip(f"{cached} is in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError) as info:
        factory()
    assert time.perf_counter() - t0 < 30
    msg = str(info.value)
    assert needle in msg and option in msg


def test_get_reward_builds_tiny_via_registry():
    from flowbp_train.rewards import get_reward

    r = get_reward("clipscore", model=tiny_clip(), tokenizer=ToyTokenizer())
    assert isinstance(r, CLIPScoreReward)
    assert np.isfinite(r.score(_images(), PROMPTS).numpy()).all()
