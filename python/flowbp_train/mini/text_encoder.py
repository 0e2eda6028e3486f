"""The miniature's tiny text encoder: a word tokenizer and a one-layer transformer (about 43k params).

It maps a prompt to what diffusers' ``SD3Transformer2DModel`` takes from its text encoders:
``encoder_hidden_states`` ``[B, L, dim]`` (per-token features) and ``pooled_projections`` ``[B, dim]``
(a masked mean over the tokens). A begin token is always present, so the null prompt "" has a
well-defined embedding (the CFG negative branch). Trained jointly with the transformer in pretraining
(:mod:`flowbp_train.mini.pretrain`), then frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flowbp_train.mini.data import TEMPLATES, WORDS

PAD, BOS, UNK = "<pad>", "<s>", "<unk>"
#: The vocabulary: special tokens, template words, digit words (fixed order: token ids are saved weights).
VOCAB: tuple[str, ...] = (PAD, BOS, UNK) + tuple(
    dict.fromkeys(w for t in TEMPLATES for w in t.replace("{}", "").split())
) + WORDS
MAX_TOKENS = 5  # the begin token + the longest prompt (4 words)


def tokenize(prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, MAX_TOKENS]`` and a validity mask (True for real tokens); unknown words map to
    ``<unk>``, prompts longer than ``MAX_TOKENS - 1`` words raise ValueError."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of str")
    index = {w: i for i, w in enumerate(VOCAB)}
    ids = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.long)
    mask = torch.zeros(len(prompts), MAX_TOKENS, dtype=torch.bool)
    for b, p in enumerate(prompts):
        words = p.strip().lower().split()
        if len(words) > MAX_TOKENS - 1:
            raise ValueError(f"prompts may have at most {MAX_TOKENS - 1} words, got {p!r}")
        toks = [index[BOS]] + [index.get(w, index[UNK]) for w in words]
        ids[b, : len(toks)] = torch.tensor(toks)
        mask[b, : len(toks)] = True
    return ids, mask


class TinyTextEncoder(nn.Module):
    """Token + position embedding, one pre-norm transformer layer, per-token and pooled projections."""

    def __init__(self, width: int = 64, out_dim: int = 64, heads: int = 4, ff: int = 128):
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), width)
        self.pos = nn.Parameter(torch.zeros(MAX_TOKENS, width))
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, ff), nn.GELU(), nn.Linear(ff, width))
        self.norm_out = nn.LayerNorm(width)
        self.proj_tokens = nn.Linear(width, out_dim)
        self.proj_pooled = nn.Linear(width, out_dim)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids``, ``mask`` ``[B, L]`` -> (``encoder_hidden_states`` ``[B, L, out]``, ``pooled`` ``[B, out]``).
        Padded positions are zeroed in ``encoder_hidden_states`` (the transformer attends to them)."""
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        q = self.norm1(h)
        a, _ = self.attn(q, q, q, key_padding_mask=~mask, need_weights=False)
        h = h + a
        h = h + self.mlp(self.norm2(h))
        h = self.norm_out(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        tokens = self.proj_tokens(h) * m
        pooled = self.proj_pooled((h * m).sum(1) / m.sum(1))
        return tokens, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize and encode on the module's device."""
        ids, mask = tokenize(prompts)
        dev = self.tok.weight.device
        return self.forward(ids.to(dev), mask.to(dev))
