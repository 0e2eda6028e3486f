"""The networks behind the miniature's rewards: the reward CNN (trained on half A) and the judge (half B).

Reward: a small CNN (about 160k parameters, smooth SiLU activations so its input gradient is useful)
on the 16x16 image; the training reward is ``log p(prompt's digit | image)``. Judge: an RBF support
vector classifier (scikit-learn ``SVC``) on the image average-pooled to 8x8, trained on the other half:
a different model family, a different view (it cannot see pixel-level stripes) and different data, so
reward hacking of the CNN shows as a gap between the two (the paper's in- vs out-of-domain protocol).
The SVC is stored as plain tensors (support vectors, dual coefficients, intercepts) in safetensors and
evaluated in torch; :func:`svc_decisions` reproduces libsvm's one-vs-one decision values. Both load
from the committed, hash-checked files; ``flowbp-mini train-reward`` / ``train-judge`` remake them
(``flowbp_train.mini.classifier``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowbp_train.digits import NUM_CLASSES, WEIGHTS_DIR
from flowbp_train.weights import read_safetensors, verified_path

REWARD_FILE = "reward_cnn.safetensors"
JUDGE_FILE = "judge_svc.safetensors"


class DigitCNN(nn.Module):
    """``[B, 1, 16, 16]`` in [-1, 1] -> ``[B, 10]`` logits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.SiLU(), nn.Linear(128, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_reward_cnn(weights_dir: str | Path | None = None) -> DigitCNN:
    """The reward CNN of ``weights_dir`` (default: the committed one), hash-checked, eval mode, frozen."""
    net = DigitCNN()
    net.load_state_dict(read_safetensors(verified_path(REWARD_FILE, _folder(weights_dir))))
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ judge
def judge_features(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, 16, 16]`` in [-1, 1] -> ``[B, 64]``: the 2x2 average pool, flattened (the judge's view)."""
    return F.avg_pool2d(images, 2).flatten(1)


class SVCJudge:
    """An RBF one-vs-one SVC stored as tensors; ``predict(images)`` -> ``[B]`` digits."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.sv = tensors["support_vectors"].double()
        self.coef = tensors["dual_coef"].double()
        self.intercept = tensors["intercept"].double()
        self.n_support = [int(n) for n in tensors["n_support"]]
        self.gamma = float(tensors["gamma"])
        self.classes = tensors["classes"].long()

    def decisions(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, n_pairs]`` one-vs-one decision values in libsvm's pair order (0,1), (0,2), ..."""
        return svc_decisions(judge_features(images.detach().double().cpu()), self.sv, self.coef,
                             self.intercept, self.n_support, self.gamma)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        dec = self.decisions(images)
        k = len(self.n_support)
        votes = torch.zeros(dec.shape[0], k, dtype=torch.long)
        p = 0
        for i in range(k):
            for j in range(i + 1, k):
                win_i = dec[:, p] > 0
                votes[:, i] += win_i.long()
                votes[:, j] += (~win_i).long()
                p += 1
        return self.classes[votes.argmax(1)]  # ties go to the lowest class index, as in libsvm


def svc_decisions(x: torch.Tensor, sv: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor,
                  n_support: list[int], gamma: float) -> torch.Tensor:
    """libsvm's one-vs-one decision values: for classes i < j,
    ``sum_{s in SV_i} coef[j-1, s] K(x, s) + sum_{s in SV_j} coef[i, s] K(x, s) + intercept[p]``,
    with ``K(x, s) = exp(-gamma |x - s|^2)``; positive means class i."""
    kern = torch.exp(-gamma * torch.cdist(x, sv).pow(2))
    starts = [0]
    for n in n_support:
        starts.append(starts[-1] + n)
    out, p, k = [], 0, len(n_support)
    for i in range(k):
        for j in range(i + 1, k):
            si, sj = slice(starts[i], starts[i + 1]), slice(starts[j], starts[j + 1])
            d = kern[:, si] @ coef[j - 1, si] + kern[:, sj] @ coef[i, sj] + intercept[p]
            out.append(d)
            p += 1
    return torch.stack(out, 1)


def load_judge(weights_dir: str | Path | None = None) -> SVCJudge:
    """The judge of ``weights_dir`` (default: the committed one), hash-checked."""
    return SVCJudge(read_safetensors(verified_path(JUDGE_FILE, _folder(weights_dir))))


def _folder(weights_dir: str | Path | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
