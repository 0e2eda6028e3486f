"""Rectified-flow pretraining of the miniature (``flowbp-mini pretrain``).

Joint training of the tiny text encoder and the tiny SD3 transformer on all 1,797 digits:
``x_t = (1 - t) x_0 + t eps``, target velocity ``eps - x_0`` (shared/design/ALGORITHM.md section 1),
t logit-normal (SD3's sampling of training times), timestep ``1000 t`` as diffusers' SD3 scheduler
passes it, 10% null prompts so classifier-free guidance works. AdamW with linear warm-up and cosine
decay, gradient clipping at 1.0, an EMA of the weights (the EMA is what is saved). Reproducible from the
seed on the same thread count; different thread counts change float summation order only.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowbp_train.digits import NULL_PROMPT, TEMPLATES, prompt_for
from flowbp_train.mini import DEFAULT_OUT_DIR
from flowbp_train.mini.data import load_digits
from flowbp_train.models.mini import BASE_FILE, build_text_encoder, build_transformer, save_base


@dataclass
class PretrainConfig:
    """Hyper-parameters of the pretraining run (the committed weights used the defaults)."""

    steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.995
    null_prompt_prob: float = 0.1
    seed: int = 0
    threads: int = 1
    log_every: int = 50

    def validate(self) -> None:
        for name in ("steps", "batch_size", "threads", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.null_prompt_prob < 1:
            raise ValueError(f"null_prompt_prob must be in [0, 1), got {self.null_prompt_prob}")


def _lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * frac))
    return cfg.learning_rate * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * cos)


def flow_matching_loss(transformer, text_encoder, x0: torch.Tensor, prompts: list[str],
                       gen: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss of one batch: mean ``|v_theta(x_t, t, c) - (eps - x_0)|^2``."""
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.sigmoid(torch.randn(b, generator=gen))  # logit-normal(0, 1)
    tb = t.view(b, 1, 1, 1)
    xt = (1 - tb) * x0 + tb * eps
    enc, pooled = text_encoder.encode(prompts)
    v = transformer(hidden_states=xt, encoder_hidden_states=enc, pooled_projections=pooled,
                    timestep=t * 1000, return_dict=False)[0]
    return (v - (eps - x0)).pow(2).mean()


def pretrain(cfg: PretrainConfig | None = None, out_dir: str | Path | None = None, log=print) -> dict:
    """Run the pretraining and save ``mini_base.safetensors`` (EMA weights) into ``out_dir`` (default:
    ``./flowbp-mini-weights``, never the installed package), recording its sha256. Returns a summary dict."""
    cfg = cfg or PretrainConfig()
    cfg.validate()
    out_dir = Path(out_dir if out_dir is not None else DEFAULT_OUT_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = load_digits("all")
    transformer, text_encoder = build_transformer(), build_text_encoder()
    modules = torch.nn.ModuleDict({"transformer": transformer, "text_encoder": text_encoder}).train()
    params = [p for p in modules.parameters()]
    ema = copy.deepcopy(modules).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    losses, t0 = [], time.perf_counter()
    m = len(data)
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        idx = torch.randint(0, m, (cfg.batch_size,), generator=gen)
        tmpl = torch.randint(0, len(TEMPLATES), (cfg.batch_size,), generator=gen)
        null = torch.rand(cfg.batch_size, generator=gen) < cfg.null_prompt_prob
        prompts = [NULL_PROMPT if n else prompt_for(int(d), int(t))
                   for d, t, n in zip(data.labels[idx], tmpl, null)]
        loss = flow_matching_loss(transformer, text_encoder, data.images[idx], prompts, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), modules.parameters()):
                pe.lerp_(p, 1 - cfg.ema_decay)
        losses.append(float(loss.detach()))
        if (step + 1) % cfg.log_every == 0 or step == 0:
            recent = sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:])
            log(f"step {step + 1}/{cfg.steps}  loss {recent:.4f}  lr {_lr_at(step, cfg):.2e}  "
                f"{time.perf_counter() - t0:.0f}s")
    seconds = time.perf_counter() - t0
    summary = {"config": asdict(cfg), "seconds": round(seconds, 1), "final_loss_mean_100": sum(losses[-100:])
               / len(losses[-100:]), "loss_curve_every_50": [round(x, 4) for x in losses[::50]]}
    sha = save_base(ema["transformer"], ema["text_encoder"], out_dir / BASE_FILE,
                    metadata={"pretrain": summary["config"]})
    summary["sha256"] = sha
    (out_dir / "pretrain_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"saved {out_dir / BASE_FILE} ({seconds:.0f}s, sha256 {sha[:12]})")
    return summary
