"""Data, prompts, tokenizer and image statistics of the miniature, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowbp_train.digits import NUM_CLASSES, TEMPLATES, all_prompts, digit_of_prompt, prompt_for
from flowbp_train.mini import metrics
from flowbp_train.mini.data import load_digits
from flowbp_train.models.mini import MAX_TOKENS, TinyTextEncoder, tokenize


def test_digits_shapes_range_and_halves():
    from sklearn.datasets import load_digits as sk

    full = load_digits()
    a, b = load_digits("A"), load_digits("B")
    assert full.images.shape == (1797, 1, 16, 16)
    assert float(full.images.min()) >= -1 and float(full.images.max()) <= 1
    assert len(a) + len(b) == 1797 and len(a) == 899
    # half A is the even indices, compared with sklearn's own labels
    assert torch.equal(a.labels, torch.from_numpy(sk().target[::2]).long())
    for c in range(NUM_CLASSES):  # balanced halves: every class has 80..100 images in each half
        assert 80 <= int((a.labels == c).sum()) <= 100 and 80 <= int((b.labels == c).sum()) <= 100
    # a 16x16 image averaged back to 8x8 stays close to the original (bilinear x2 then 2x2 mean)
    x8 = torch.tensor(sk().images[:5], dtype=torch.float32)[:, None] / 8 - 1
    back = torch.nn.functional.avg_pool2d(full.images[:5], 2)
    assert float((back - x8).abs().mean()) < 0.2


def test_prompts_round_trip_and_errors():
    for t in range(len(TEMPLATES)):
        for d in range(NUM_CLASSES):
            assert digit_of_prompt(prompt_for(d, t)) == d
    assert len(set(all_prompts())) == NUM_CLASSES * len(TEMPLATES)
    with pytest.raises(ValueError, match="digit"):
        prompt_for(10)
    with pytest.raises(ValueError, match="prompt"):
        digit_of_prompt("a handwritten cat")
    with pytest.raises(TypeError, match="prompts"):
        tokenize("a handwritten digit one")
    with pytest.raises(ValueError, match="at most"):
        tokenize(["a b c d e"])


def test_text_encoder_masks_padding():
    torch.manual_seed(0)
    enc = TinyTextEncoder().eval()
    ids, mask = tokenize(["digit one", ""])
    assert mask.sum(1).tolist() == [3, 1] and ids.shape == (2, MAX_TOKENS)
    tok, pooled = enc(ids, mask)
    assert torch.all(tok[0, 3:] == 0) and torch.all(tok[1, 1:] == 0)
    # padding tokens do not change the result: changing the ids there leaves the output unchanged
    ids2 = ids.clone()
    ids2[0, 3:] = 5
    tok2, pooled2 = enc(ids2, mask)
    torch.testing.assert_close(pooled2, pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(tok2, tok, rtol=0, atol=1e-6)


def _np_images(seed=0, b=12):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(b, 1, 16, 16)), rng.integers(0, 3, size=b)


def test_diversity_matches_loops():
    x, y = _np_images()
    ref = []
    for c in np.unique(y):
        xc = x[y == c].reshape((y == c).sum(), -1)
        if len(xc) < 2:
            continue
        ds = [np.linalg.norm(xc[i] - xc[j]) for i in range(len(xc)) for j in range(len(xc)) if i != j]
        ref.append(np.mean(ds))
    assert metrics.diversity(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(np.mean(ref), rel=1e-12)
    with pytest.raises(ValueError, match="labels"):
        metrics.diversity(torch.from_numpy(x), torch.zeros(3))


def test_total_variation_and_high_frequency_match_numpy():
    x, _ = _np_images(1)
    u = (x + 1) / 2
    tv = np.abs(np.diff(u, axis=2)).mean() + np.abs(np.diff(u, axis=3)).mean()
    assert metrics.total_variation(torch.from_numpy(x)) == pytest.approx(tv, rel=1e-12)
    # high-frequency energy by numpy's FFT with an explicit loop over frequencies
    fr = []
    for img in x[:, 0]:
        img = img - img.mean()
        p = np.abs(np.fft.fft2(img)) ** 2
        f = np.abs(np.fft.fftfreq(16))
        hi = sum(p[a, b] for a in range(16) for b in range(16) if max(f[a], f[b]) >= 0.25)
        fr.append(hi / p.sum())
    assert metrics.high_frequency_energy(torch.from_numpy(x)) == pytest.approx(np.mean(fr), rel=1e-10)
    # a checkerboard is all high frequency, a constant-plus-ramp image none at the top band
    checker = torch.tensor([[(-1.0) ** (i + j) for j in range(16)] for i in range(16)])[None, None]
    assert metrics.high_frequency_energy(checker) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="images"):
        metrics.total_variation(torch.zeros(16, 16))
