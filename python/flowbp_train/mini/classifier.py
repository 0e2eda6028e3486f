"""The miniature's two scorers: the reward CNN (trained on half A) and the judge (trained on half B).

Reward: a small CNN (about 160k parameters, smooth SiLU activations so its input gradient is useful)
on the 16x16 image; the training reward is ``log p(prompt's digit | image)``. Judge: an RBF support
vector classifier (scikit-learn ``SVC``) on the image average-pooled to 8x8, trained on the other half:
a different model family, a different view (it cannot see pixel-level stripes) and different data, so
reward hacking of the CNN shows as a gap between the two (the paper's in- vs out-of-domain protocol).
The SVC is stored as plain tensors (support vectors, dual coefficients, intercepts) in safetensors and
evaluated in torch; :func:`svc_decisions` reproduces libsvm's one-vs-one decision values.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowbp_train.mini.data import NUM_CLASSES, load_digits
from flowbp_train.mini.model import DEFAULT_OUT_DIR, save_weights, verified_path

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


def _shift_augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (replicate padding), per image."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16] for i in range(b)])


def train_reward_cnn(epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                     out_dir: str | Path | None = None, log=print) -> dict:
    """Train the reward CNN on half A, report accuracy on half B, save ``reward_cnn.safetensors``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, held = load_digits("A"), load_digits("B")
    net = DigitCNN()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.perf_counter()
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for s in range(0, len(train), batch_size):
            idx = perm[s:s + batch_size]
            x = _shift_augment(train.images[idx], gen)
            x = x + 0.05 * torch.randn(x.shape, generator=gen)  # mild noise: samples are not exactly data
            loss = F.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if (ep + 1) % 5 == 0:
            log(f"epoch {ep + 1}/{epochs}  loss {float(loss.detach()):.4f}")
    net.eval()
    with torch.no_grad():
        acc = float((net(held.images).argmax(1) == held.labels).float().mean())
    out_dir = Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REWARD_FILE
    meta = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "heldout_accuracy_B": acc}
    sha = save_weights(net.state_dict(), path, meta)
    log(f"reward CNN: held-out (half B) accuracy {acc:.4f}; saved {path} ({time.perf_counter() - t0:.0f}s)")
    return {**meta, "sha256": sha, "seconds": time.perf_counter() - t0}


def load_reward_cnn(weights_dir: str | Path | None = None) -> DigitCNN:
    """The committed reward CNN (hash-checked), eval mode, frozen."""
    from safetensors.torch import load_file

    net = DigitCNN()
    net.load_state_dict(load_file(str(verified_path(REWARD_FILE, weights_dir))))
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


def train_judge(C: float = 10.0, out_dir: str | Path | None = None, log=print) -> dict:
    """Fit the RBF SVC on half B (pooled view), report accuracy on half A, save ``judge_svc.safetensors``."""
    from sklearn.svm import SVC

    t0 = time.perf_counter()
    train, held = load_digits("B"), load_digits("A")
    svc = SVC(C=C, kernel="rbf", gamma="scale").fit(judge_features(train.images).double().numpy(),
                                                    train.labels.numpy())
    tensors = {
        "support_vectors": torch.from_numpy(svc.support_vectors_).double(),
        "dual_coef": torch.from_numpy(svc.dual_coef_).double(),
        "intercept": torch.from_numpy(svc.intercept_).double(),
        "n_support": torch.from_numpy(svc.n_support_).long(),
        "gamma": torch.tensor(float(svc._gamma), dtype=torch.float64),
        "classes": torch.from_numpy(svc.classes_).long(),
    }
    judge = SVCJudge(tensors)
    acc = float((judge.predict(held.images) == held.labels).float().mean())
    out_dir = Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / JUDGE_FILE
    meta = {"C": C, "gamma": float(svc._gamma), "heldout_accuracy_A": acc, "num_support": int(sum(svc.n_support_))}
    sha = save_weights(tensors, path, meta)
    log(f"judge SVC: held-out (half A) accuracy {acc:.4f}; {meta['num_support']} support vectors; saved {path}")
    return {**meta, "sha256": sha, "seconds": time.perf_counter() - t0}


def load_judge(weights_dir: str | Path | None = None) -> SVCJudge:
    """The committed judge (hash-checked)."""
    from safetensors.torch import load_file

    return SVCJudge(load_file(str(verified_path(JUDGE_FILE, weights_dir))))
