"""Tiny but complete diffusers folders of the three families, built offline, as a user would have them.

Every component is the class the stock pipeline loads (``FluxPipeline``, ``StableDiffusion3Pipeline``,
``Flux2KleinPipeline``): real tokenizers (CLIP byte-level BPE, T5 unigram, Qwen2 byte-level BPE) trained
here with the ``tokenizers`` library on a few sentences, real text encoders (CLIP, T5, Qwen3) at tiny
widths, the transformer and VAE of each family, saved with ``save_pretrained``; the later families
(Z-Image: Qwen3; FLUX.2-dev: Mistral3 with a Mistral-format BPE) follow the same pattern. A tiny CLIP folder
(model + tokenizer + image processor) serves the ``pickscore`` reward offline. No hub access anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: what the tokenizers are trained on (the training prompts of the suite are among them)
CORPUS = [
    "a cat sitting on a red sofa", "a dog running in the park", "a red bus on a rainy street",
    "a bowl of ramen with steam", "a lighthouse on a cliff at night", "an astronaut riding a horse",
    "a watercolor painting of flowers", "the quick brown fox jumps over the lazy dog",
    "a photo of a mountain lake at sunrise", "portrait of an old fisherman, dramatic lighting",
]
PROMPTS = CORPUS[:4]
RESOLUTION = 16  # images the suite trains and samples at (the VAE halves it once: 8x8 latents)
TEXT_DIM = 32    # T5 d_model / joint attention width of the tiny FLUX.1 and SD3 transformers
QWEN_HIDDEN = 16  # FLUX.2 reads Qwen3 hidden states of layers (9, 18, 27): 3 x 16 = 48 features
QWEN_LAYERS = 27
CLIP_MAX_TOKENS = 77  # the CLIP tokenizers' model_max_length (the pipelines pad CLIP prompts to it)
#: the pipeline class each family's folder must load with
PIPELINES = {"flux1": "FluxPipeline", "sd3": "StableDiffusion3Pipeline", "flux2": "Flux2KleinPipeline"}


# ------------------------------------------------------------------------------------------ tokenizers
def clip_tokenizer():
    """CLIP's byte-level BPE with ``</w>`` word ends, trained on CORPUS, as a ``CLIPTokenizer``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=eos, end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                                   r"""[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[bos, eos], end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for ch in alphabet:  # every byte, also as a word end, so that no input maps to the unknown token
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_TOKENS)


def t5_tokenizer():
    """T5's unigram model (sentencepiece-style ``▁`` word starts), trained on CORPUS, as a ``T5Tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(tok.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def qwen_tokenizer():
    """Qwen2's byte-level BPE with the chat special tokens and a chat template, as a ``Qwen2Tokenizer``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix=""))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS + ["user assistant <think> </think>"], trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = {k: v for k, v in model["vocab"].items() if k not in special}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    out = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    out.add_special_tokens({"additional_special_tokens": special[1:]})
    out.chat_template = QWEN_CHAT_TEMPLATE
    return out


# ------------------------------------------------------------------------------------------ components
def _clip_text(tokenizer, hidden: int, projection: int | None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=TEXT_DIM, d_kv=8, d_ff=2 * TEXT_DIM, num_layers=2,
                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return T5EncoderModel(cfg).eval()


def _vae_kl():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=0.1, scaling_factor=0.5)


def _vae_flux2():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():  # non-trivial latent statistics, so decoding's un-normalisation matters
        vae.bn.running_mean.uniform_(-0.2, 0.2)
        vae.bn.running_var.uniform_(0.5, 1.5)
    return vae


def _scheduler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def flux1_pipeline(clip_tok, t5_tok):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True,
        axes_dims_rope=(4, 6, 6))
    sched = _scheduler(use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                       max_shift=1.15)
    return FluxPipeline(scheduler=sched, vae=_vae_kl(), text_encoder=_clip_text(clip_tok, TEXT_DIM, None),
                        tokenizer=clip_tok, text_encoder_2=_t5(t5_tok), tokenizer_2=t5_tok, transformer=transformer)


def sd3_pipeline(clip_tok, t5_tok):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    half = TEXT_DIM // 2  # the two CLIP towers' features are concatenated (and padded to the T5 width)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=TEXT_DIM, caption_projection_dim=16, pooled_projection_dim=TEXT_DIM, out_channels=4,
        pos_embed_max_size=8, qk_norm="rms_norm", dual_attention_layers=(0,))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=_scheduler(shift=3.0), vae=_vae_kl(),
        text_encoder=_clip_text(clip_tok, half, half), tokenizer=clip_tok,
        text_encoder_2=_clip_text(clip_tok, half, half), tokenizer_2=clip_tok,
        text_encoder_3=_t5(t5_tok), tokenizer_3=t5_tok)


def flux2_pipeline(qwen_tok):
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qcfg = Qwen3Config(vocab_size=len(qwen_tok), hidden_size=QWEN_HIDDEN, intermediate_size=2 * QWEN_HIDDEN,
                       num_hidden_layers=QWEN_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       pad_token_id=qwen_tok.pad_token_id, eos_token_id=qwen_tok.eos_token_id)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * QWEN_HIDDEN, timestep_guidance_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=_scheduler(use_dynamic_shifting=True), vae=_vae_flux2(),
                              text_encoder=Qwen3ForCausalLM(qcfg).eval(), tokenizer=qwen_tok,
                              transformer=transformer, is_distilled=False)


def zimage_pipeline(qwen_tok):
    """Z-Image: a Qwen3 text encoder (second-to-last hidden state, QWEN_HIDDEN wide) and the Z-Image
    transformer on the FLUX.1-style VAE, static shift as the published scheduler."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    qcfg = Qwen3Config(vocab_size=len(qwen_tok), hidden_size=QWEN_HIDDEN, intermediate_size=2 * QWEN_HIDDEN,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=1024, tie_word_embeddings=True,
                       pad_token_id=qwen_tok.pad_token_id, eos_token_id=qwen_tok.eos_token_id)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=1, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=QWEN_HIDDEN, axes_dims=[4, 6, 6], axes_lens=[640, 32, 32])
    with torch.no_grad():  # diffusers starts the final layer at zero: random, so a LoRA changes the image
        for p in transformer.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.1)
    return ZImagePipeline(scheduler=_scheduler(use_dynamic_shifting=False, shift=3.0), vae=_vae_kl(),
                          text_encoder=Qwen3Model(qcfg).eval(), tokenizer=qwen_tok, transformer=transformer)


PIPELINES["z-image"] = "ZImagePipeline"

# FLUX.2-dev reads Mistral hidden states of layers (10, 20, 30) (Flux2Pipeline's text_encoder_out_layers)
MISTRAL_HIDDEN, MISTRAL_LAYERS = 16, 30
#: Mistral's instruction format, as the Mistral-Small-3.1 template renders the pipeline's text-only
#: messages (content a string or a list of {"type": "text"} parts); image parts are not needed here
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


def mistral_tokenizer():
    """A byte-level BPE with Mistral's control tokens and the instruction chat template, trained on CORPUS
    and Flux2Pipeline's system message, as a fast tokenizer.

    The published FLUX.2-dev folder holds a ``PixtralProcessor`` (this tokenizer plus an image processor)
    in ``tokenizer/``; for text-only prompts ``Flux2Pipeline`` only calls its ``apply_chat_template``, which
    renders the template and tokenizes, exactly as the tokenizer's own does (checked where torchvision, which
    the processor class requires, works). The folder therefore holds the tokenizer: it loads without
    torchvision, on every machine of the CI."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=MISTRAL_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*CORPUS, SYSTEM_MESSAGE], trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", model_max_length=1024)
    out.chat_template = MISTRAL_CHAT_TEMPLATE
    return out


def pixtral_processor(tokenizer):
    """The published class of FLUX.2-dev's ``tokenizer/`` around ``tokenizer`` (needs torchvision)."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    return PixtralProcessor(image_processor=PixtralImageProcessor(patch_size=4, size={"longest_edge": 16}),
                            tokenizer=tokenizer, patch_size=4, chat_template=MISTRAL_CHAT_TEMPLATE)


def flux2_dev_pipeline(mistral_tok):
    """FLUX.2-dev: a ``Mistral3ForConditionalGeneration`` text encoder (30 layers, MISTRAL_HIDDEN wide, a
    tiny Pixtral vision tower), the FLUX.2 transformer with its guidance embedding, the FLUX.2 VAE."""
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    ids = {k: mistral_tok.convert_tokens_to_ids(t) for k, t in
           (("bos_token_id", "<s>"), ("eos_token_id", "</s>"), ("pad_token_id", "<pad>"))}
    cfg = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(mistral_tok), hidden_size=MISTRAL_HIDDEN,
                         intermediate_size=2 * MISTRAL_HIDDEN, num_hidden_layers=MISTRAL_LAYERS,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         sliding_window=None, **ids),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4, num_channels=3),
        image_token_index=mistral_tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1, **ids)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * MISTRAL_HIDDEN, timestep_guidance_channels=16,
        mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)
    return Flux2Pipeline(scheduler=_scheduler(use_dynamic_shifting=True), vae=_vae_flux2(),
                         text_encoder=Mistral3ForConditionalGeneration(cfg).eval(), tokenizer=mistral_tok,
                         transformer=transformer)


PIPELINES["flux2-dev"] = "Flux2Pipeline"


def reward_clip(clip_tok):
    """A tiny ``CLIPModel`` (text and vision towers, 224 px input as PickScore's) for the reward."""
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS,
                         bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id,
                         pad_token_id=clip_tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=16)
    return CLIPModel(cfg).eval()


def EXTRA_FAMILIES(clip_tok, t5_tok, qwen_tok) -> list:  # noqa: N802 (a table, built per call)
    """The families added after the first three, each one entry: (name, builder)."""
    return [("z-image", lambda: zimage_pipeline(qwen_tok)),
            ("flux2-dev", lambda: flux2_dev_pipeline(mistral_tokenizer()))]


def build_all(root: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``root/{flux1,sd3,flux2,clip}`` and ``root/prompts.txt``; returns the paths by name."""
    from transformers import CLIPImageProcessor

    root = Path(root)
    clip_tok, t5_tok, qwen_tok = clip_tokenizer(), t5_tokenizer(), qwen_tokenizer()
    paths = {}
    for k, (name, make) in enumerate((("flux1", lambda: flux1_pipeline(clip_tok, t5_tok)),
                                      ("sd3", lambda: sd3_pipeline(clip_tok, t5_tok)),
                                      ("flux2", lambda: flux2_pipeline(qwen_tok)),
                                      *EXTRA_FAMILIES(clip_tok, t5_tok, qwen_tok))):
        torch.manual_seed(seed + k)
        paths[name] = root / name
        make().save_pretrained(paths[name])
    torch.manual_seed(seed + 10)
    paths["clip"] = root / "clip"
    reward_clip(clip_tok).save_pretrained(paths["clip"])
    clip_tok.save_pretrained(paths["clip"])
    CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}).save_pretrained(paths["clip"])
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("\n".join(PROMPTS) + "\n")
    return paths
