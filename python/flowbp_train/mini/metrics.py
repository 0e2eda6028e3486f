"""Image statistics of the miniature that make reward hacking visible beside reward and judge.

- diversity: mean pairwise L2 distance between samples of the same digit (images in [-1, 1],
  flattened), averaged over digits; full backprop collapses it (shared/design/MINIATURE.md).
- total variation: mean absolute difference between neighbouring pixels (both axes, images in [0, 1]);
- high-frequency energy: the fraction of the (mean-removed) image's 2-d DFT energy at frequencies with
  ``max(|f_x|, |f_y|) >= 1/4`` cycles per pixel (the upper half of the band; stripes live there).
Real data gives the reference values (:func:`data_reference`).
"""

from __future__ import annotations

import torch


def _check_images(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {got}")
    return images.detach().double()


def diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Intra-class mean pairwise L2 distance of ``images`` in [-1, 1], averaged over the classes that
    have at least two images. ``labels``: ``[B]`` digits."""
    x = _check_images(images).flatten(1)
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape [{x.shape[0]}], got {tuple(labels.shape)}")
    per_class = []
    for c in labels.unique():
        xc = x[labels == c]
        n = xc.shape[0]
        if n < 2:
            continue
        d = torch.cdist(xc, xc)
        per_class.append(float(d.sum() / (n * (n - 1))))
    if not per_class:
        raise ValueError("diversity needs at least two images of some class")
    return sum(per_class) / len(per_class)


def total_variation(images: torch.Tensor) -> float:
    """Mean ``|x[h+1, w] - x[h, w]|`` plus mean ``|x[h, w+1] - x[h, w]|`` of images in [-1, 1] mapped to
    [0, 1]; averaged over the batch."""
    x = (_check_images(images) + 1) / 2
    return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())


def high_frequency_energy(images: torch.Tensor, cutoff: float = 0.25) -> float:
    """Fraction of spectral energy at ``max(|f_x|, |f_y|) >= cutoff`` cycles/pixel (mean removed per
    image), averaged over the batch."""
    x = _check_images(images)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(x).abs().pow(2)
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64).abs().view(-1, 1)
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64).abs().view(1, -1)
    high = (torch.maximum(fy, fx) >= cutoff).to(power.dtype)
    total = power.sum(dim=(-2, -1)).clamp_min(1e-30)
    return float(((power * high).sum(dim=(-2, -1)) / total).mean())


def image_stats(images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """The three statistics of a batch, as a dict."""
    return {"diversity": diversity(images, labels), "total_variation": total_variation(images),
            "high_freq_energy": high_frequency_energy(images)}


def data_reference(half: str = "B", per_class: int = 32) -> dict[str, float]:
    """The statistics of real digits (the first ``per_class`` of each digit in ``half``)."""
    from flowbp_train.digits import NUM_CLASSES
    from flowbp_train.mini.data import load_digits

    d = load_digits(half)
    idx = torch.cat([torch.nonzero(d.labels == c).flatten()[:per_class] for c in range(NUM_CLASSES)])
    return image_stats(d.images[idx], d.labels[idx])
