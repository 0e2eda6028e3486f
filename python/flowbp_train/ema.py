"""The exponential moving average of the trainable parameters (``use_ema``, ``ema_decay``; the authors': 0.995).

Shadow copies in fp32 whatever the parameters' dtype, updated after every optimizer step with
``shadow <- shadow + (1 - decay) (p - shadow)``; :meth:`EMA.swapped_in` loads them into the parameters
for the final weights and the sample images, then puts the trained ones back. Its state (decay and
shadows) is saved in every checkpoint (``ema.pt``, or the shards under several ranks).
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    """Exponential moving average of the trainable parameters (fp32 shadow copies)."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the parameters."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for s, p in zip(self.shadow, self.params):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for v, p in zip(saved, self.params):
                    p.copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
