"""Tiny random-weight stand-ins of the reward architectures, built from configs, and a toy tokenizer.

Same classes as the real rewards (transformers CLIPModel, BLIP vision/text towers, open_clip CLIP) with a
few layers and small widths, at the real input resolution 224 so the preprocessing path is the real one.
"""

from __future__ import annotations

import torch

VOCAB = 64
EOS = VOCAB - 1  # the largest id, so "argmax of ids" and "eos_token_id" pooling agree
BOS = VOCAB - 2


class ToyTokenizer:
    """HF-style call: words hashed to ids in [1, VOCAB-3], wrapped in BOS/EOS, padded with 0."""

    def __call__(self, prompts, padding="max_length", truncation=True, max_length=16, return_tensors="pt"):
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            words = [1 + (sum(map(ord, w)) * 7919) % (VOCAB - 3) for w in p.lower().split()]
            seq = [BOS, *words[: max_length - 2], EOS]
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def tiny_clip(seed: int = 0, projection_dim: int = 16):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=16, eos_token_id=EOS, bos_token_id=BOS,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=projection_dim,
    )
    return CLIPModel(cfg).eval()


class _VisualEncoder(torch.nn.Module):
    def __init__(self, vision):
        super().__init__()
        self.vision = vision

    def forward(self, pixels):
        return self.vision(pixel_values=pixels).last_hidden_state


class TinyImageReward(torch.nn.Module):
    """The ImageReward layout (``blip.visual_encoder``, ``blip.text_encoder`` with cross-attention,
    ``blip.tokenizer``, ``mlp``, ``mean``, ``std``) on transformers' BLIP towers (the MED architecture)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        torch.manual_seed(seed)
        vision = BlipVisionModel(BlipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=224, patch_size=32,
                                                  initializer_range=0.3))
        text = BlipTextModel(BlipTextConfig(vocab_size=VOCAB, hidden_size=32, encoder_hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                            max_position_embeddings=40, pad_token_id=0, initializer_range=0.3),
                             add_pooling_layer=False)
        self.blip = torch.nn.Module()
        self.blip.visual_encoder = _VisualEncoder(vision)
        self.blip.text_encoder = text
        self.blip.tokenizer = ToyTokenizer()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 1))
        self.mean = 0.16717362830052426
        self.std = 1.0333394966054072
        self.eval()


def tiny_open_clip(seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=224, layers=2, width=32, head_width=16, patch_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    )
    return model.eval(), open_clip.get_tokenizer("ViT-H-14")
