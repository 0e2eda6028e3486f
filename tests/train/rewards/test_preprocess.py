"""Parity of the tensor preprocessing with the PIL-based reference preprocessing, and its gradient.

Tolerances (pixel values in [0, 1], compared before normalisation):
- against the PIL path written here (Pillow 1-D passes, width then height, as Pillow <= 12 always does):
  PIL rounds the intermediate image to uint8 (<= 0.5/255), the second 1-D bicubic filter (a = -0.5) can
  amplify that by its absolute weight sum (<= 1.25, at half-pixel phase -1/16, 9/16, 9/16, -1/16), the
  output is rounded again (0.5/255), and PIL's 22-bit fixed-point weights add < 0.01/255:
  STRICT = (0.5 * 1.25 + 0.5 + 0.01) / 255.
- against the reference processors themselves (transformers ``CLIPImageProcessorPil``, open_clip's
  transform), which call Pillow's 2-D resize: Pillow 13 chooses the pass order itself, and where it runs
  height first the uint8 clipping of cubic overshoot at hard edges lands differently. Measured on these
  images: max 5.0/255 at edge pixels, mean < 0.35/255; asserted: max 8/255, mean 0.5/255.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowbp_train.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    PreprocessConfig,
    clip_preprocess,
    hpsv2_preprocess,
    openclip_preprocess,
)

from helpers.images import synthetic_image, to_tensor

STRICT = (0.5 * 1.25 + 0.5 + 0.01) / 255
LOOSE_MAX, LOOSE_MEAN = 8 / 255, 0.5 / 255
# (height, width): square down/upscale, portrait, landscape, extreme ratio, odd crop offsets, near-identity
SHAPES = [(256, 256), (300, 200), (177, 411), (512, 384), (150, 150), (96, 200), (225, 227), (640, 360)]

M = np.array(OPENAI_CLIP_MEAN).reshape(3, 1, 1)
S = np.array(OPENAI_CLIP_STD).reshape(3, 1, 1)


def _pixels(normalised: torch.Tensor) -> np.ndarray:
    """Undo the normalisation of one [3, H, W] output (float64), back to [0, 1] pixels."""
    return normalised.double().numpy() * S + M


def _pil_resize_1d_passes(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pillow bicubic resize as two explicit 1-D passes, width first (uint8 intermediate), in [0, 1]."""
    pil = Image.fromarray(img)
    if width != pil.width:
        pil = pil.resize((width, pil.height), Image.BICUBIC)
    if height != pil.height:
        pil = pil.resize((width, height), Image.BICUBIC)
    return np.asarray(pil).astype(np.float64).transpose(2, 0, 1) / 255


def _shortest_crop_ref(img: np.ndarray, size: int, offset: str) -> np.ndarray:
    h, w = img.shape[:2]
    if h <= w:
        nh, nw = size, int(w * size / h)
    else:
        nh, nw = int(h * size / w), size
    r = _pil_resize_1d_passes(img, nh, nw)
    off = (lambda d: d // 2) if offset == "floor" else (lambda d: int(round(d / 2.0)))
    t, left = off(nh - size), off(nw - size)
    return r[:, t:t + size, left:left + size]


def _longest_pad_ref(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    r = _pil_resize_1d_passes(img, nh, nw)
    out = np.zeros((3, size, size))
    t, left = (size - nh) // 2, (size - nw) // 2
    out[:, t:t + nh, left:left + nw] = r
    return out


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("kind", ["clip", "openclip", "hpsv2"])
def test_matches_pil_1d_passes(hw, kind):
    img = synthetic_image(*hw, seed=hw[0] * 1000 + hw[1])
    if kind == "clip":
        ours, ref = clip_preprocess(), _shortest_crop_ref(img, 224, "floor")
    elif kind == "openclip":
        ours, ref = openclip_preprocess(), _shortest_crop_ref(img, 224, "round_half_even")
    else:
        ours, ref = hpsv2_preprocess(), _longest_pad_ref(img, 224)
    got = _pixels(ours(to_tensor([img]))[0])
    assert got.shape == ref.shape == (3, 224, 224)
    assert np.abs(got - ref).max() <= STRICT


@pytest.mark.parametrize("hw", SHAPES)
def test_matches_transformers_clip_processor(hw):
    processors = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    img = synthetic_image(*hw, seed=hw[0] + 7 * hw[1])
    ref = processors.CLIPImageProcessorPil()(images=Image.fromarray(img), return_tensors="pt").pixel_values[0]
    got = clip_preprocess()(to_tensor([img]))[0]
    diff = np.abs(_pixels(got) - _pixels(ref))
    assert diff.max() <= LOOSE_MAX and diff.mean() <= LOOSE_MEAN


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("resize_mode", ["shortest", "longest"])
def test_matches_open_clip_transform(hw, resize_mode):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (with torchvision) is not installed")
    from open_clip.transform import image_transform

    img = synthetic_image(*hw, seed=hw[0] + 3 * hw[1])
    ref = image_transform(224, is_train=False, resize_mode=resize_mode)(Image.fromarray(img))
    ours = openclip_preprocess() if resize_mode == "shortest" else hpsv2_preprocess()
    got = ours(to_tensor([img]))[0]
    diff = np.abs(_pixels(got) - _pixels(ref))
    assert open_clip is not None and diff.max() <= LOOSE_MAX and diff.mean() <= LOOSE_MEAN


@pytest.mark.parametrize("mode", ["shortest_crop", "longest_pad", "squash"])
def test_gradient_matches_finite_differences(mode):
    # float64 gradcheck of the whole path (two resize passes, crop or pad, normalise), without the clamp:
    # clamp is identity or constant piecewise and finite differences would straddle its kinks.
    pre = ImagePreprocess(PreprocessConfig(size=6, mode=mode, clamp=False))
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pre, (x,))


def test_batch_is_per_sample_and_sizes():
    x = to_tensor([synthetic_image(120, 90, seed=s) for s in range(3)])
    pre = hpsv2_preprocess()
    base = pre(x)
    y = x.clone()
    y[1] = 1 - y[1]
    out = pre(y)
    # bit-exact: each sample goes through the same per-sample operations on the same pixels in both batches
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2]) and not torch.equal(out[1], base[1])
    assert pre.resized_shape(120, 90) == (224, 168) and clip_preprocess().resized_shape(120, 90) == (298, 224)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="mode"):
        PreprocessConfig(mode="stretch")
    with pytest.raises(ValueError, match="size"):
        PreprocessConfig(size=0)
    with pytest.raises(TypeError, match="images"):
        clip_preprocess()(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images"):
        clip_preprocess()(torch.zeros(3, 8, 8))
