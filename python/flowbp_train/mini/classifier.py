"""Training the miniature's two scorers (``flowbp-mini train-reward``, ``train-judge``).

The reward CNN learns on half A of the digits (random one-pixel shifts, mild noise: samples are not
exactly data) and is scored on half B; the RBF SVC judge is fitted on half B (the pooled 8x8 view) and
scored on half A. Each writes its hash-recorded file into ``out_dir`` (default ``./flowbp-mini-weights``;
never the installed package). The networks and their loading are the rewards'
(``flowbp_train.rewards.mini_nets``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flowbp_train.mini import DEFAULT_OUT_DIR
from flowbp_train.mini.data import load_digits
from flowbp_train.rewards.mini_nets import JUDGE_FILE, REWARD_FILE, DigitCNN, SVCJudge, judge_features
from flowbp_train.weights import save_hashed


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
    sha = save_hashed(net.state_dict(), path, meta)
    log(f"reward CNN: held-out (half B) accuracy {acc:.4f}; saved {path} ({time.perf_counter() - t0:.0f}s)")
    return {**meta, "sha256": sha, "seconds": time.perf_counter() - t0}


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
    sha = save_hashed(tensors, path, meta)
    log(f"judge SVC: held-out (half A) accuracy {acc:.4f}; {meta['num_support']} support vectors; saved {path}")
    return {**meta, "sha256": sha, "seconds": time.perf_counter() - t0}
