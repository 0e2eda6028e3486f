"""Build a family's modules, adapter and reward from configuration files only: no weights are read.

The architectures come from the model folder's ``model_index.json`` and ``<component>/config.json`` files
when ``pretrained_model_name_or_path`` is a local folder, otherwise from the published architectures
shipped in ``flowbp_train/memory/architectures/`` (written from the public model descriptions; their
``_note`` says what to verify). Called inside ``FakeTensorMode`` every parameter is a fake tensor (shape,
dtype, no storage); outside it, the same code builds real randomly initialised modules (the tests'
real-tensor reference). Modules are built directly in the run's dtype, as ``from_pretrained(torch_dtype=)``
leaves them. The text encoders stay on the host, as in a real run (the pipeline is loaded on the CPU and the
adapters encode there); a tokenizer is not needed: token ids of the padded length give the same shapes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
#: family -> the shipped architecture file (the published model the recipes target)
FAMILY_FILES = {"flux1": "flux1-dev.json", "sd3": "sd3.5-medium.json", "flux2": "flux2-klein-base-9b.json"}
#: reward -> the shipped reward-tower architecture (rewards.json)
REWARD_TOWERS = {"hpsv2": "ViT-H-14", "pickscore": "ViT-H-14", "clipscore": "ViT-L-14"}
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def load_architecture(family: str) -> dict:
    """The shipped architecture of ``family`` (transformer, VAE, text encoders, scheduler)."""
    if family not in FAMILY_FILES:
        raise ValueError(f"family: no published architecture is shipped for {family!r}; "
                         f"expected one of {', '.join(FAMILY_FILES)} (or a model folder)")
    return json.loads((ARCHITECTURES / FAMILY_FILES[family]).read_text())


def as_dtype(value, key: str = "dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value in _DTYPES:
        return _DTYPES[value]
    raise ValueError(f"{key}: expected one of {', '.join(_DTYPES)}, got {value!r}")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"pretrained_model_name_or_path: cannot read {what} {path} ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"pretrained_model_name_or_path: {path} must hold a JSON object")
    return data


def folder_specs(folder: Path) -> dict:
    """Component specs read from a diffusers model folder (``model_index.json`` and the components'
    ``config.json`` files), in the layout of the shipped architecture files."""
    index = _read_json(folder / "model_index.json", "the pipeline index")
    spec: dict = {"pipeline": index.get("_class_name"), "text_encoders": {}, "source": str(folder)}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library, cls = entry
        sub = folder / name
        if name == "scheduler":
            spec["scheduler"] = _read_json(sub / "scheduler_config.json", "the scheduler config")
            continue
        if name.startswith("tokenizer"):
            continue
        config = _read_json(sub / "config.json", f"the {name} config")
        entry_spec = {"library": library, "class": cls, "config": config}
        if name.startswith("text_encoder"):
            spec["text_encoders"][name] = entry_spec
        elif name in ("transformer", "vae"):
            spec[name] = entry_spec
    for need in ("transformer", "vae"):
        if need not in spec:
            raise ValueError(f"pretrained_model_name_or_path: {folder} has no {need}/ component in model_index.json")
    return spec


def component_specs(family: str, pretrained: str | None) -> dict:
    """The specs of a run: the local model folder's configs when there is one, else the shipped ones."""
    if pretrained and Path(pretrained).is_dir():
        spec = folder_specs(Path(pretrained))
        shipped = load_architecture(family) if family in FAMILY_FILES else {}
        for name, enc in spec["text_encoders"].items():  # padded lengths the pipelines use
            enc.setdefault("max_length", shipped.get("text_encoders", {}).get(name, {}).get("max_length", 77))
            if "hidden_states_layers" in shipped.get("text_encoders", {}).get(name, {}):
                enc["hidden_states_layers"] = shipped["text_encoders"][name]["hidden_states_layers"]
        spec.setdefault("text_len", shipped.get("text_len"))
        return spec
    spec = load_architecture(family)
    spec["source"] = f"published architecture ({FAMILY_FILES[family]})"
    return spec


def build_module(spec: dict, dtype: torch.dtype) -> torch.nn.Module:
    """One diffusers or transformers model from its config, in ``dtype``, eval mode, no weights read."""
    cls_name, config = spec["class"], dict(spec["config"])
    with default_dtype(dtype):
        if spec.get("library") == "transformers":
            import transformers

            if "config_class" in spec:
                cfg = getattr(transformers, spec["config_class"])(**config)
            else:
                cfg = transformers.AutoConfig.for_model(**config)
            model = getattr(transformers, cls_name)(cfg)
        else:
            import diffusers

            cls = getattr(diffusers, cls_name)
            model = cls.from_config(config)
    return model.eval()


def _text_len(spec: dict, name: str, cfg_len: int | None) -> int:
    enc = spec["text_encoders"][name]
    if name in ("text_encoder_2", "text_encoder_3") and "T5" in enc["class"] and cfg_len:
        return cfg_len
    if enc["class"].startswith("Qwen") and cfg_len:
        return cfg_len
    return int(enc.get("max_length", 77))


def prompt_encoder(family: str, spec: dict, encoders: dict[str, torch.nn.Module], transformer_config,
                   max_sequence_length: int | None, on_host: Callable[[], contextlib.AbstractContextManager]):
    """``f(prompts) -> tensors`` shaped as the family's pipeline encodes them (the text encoders run on the
    host when the folder has them; without any, embeddings of the transformer's text width)."""
    tl = spec.get("text_len") or 512
    joint = transformer_config.joint_attention_dim
    pooled_dim = getattr(transformer_config, "pooled_projection_dim", None)

    def ids(name: str, b: int) -> torch.Tensor:
        return torch.zeros(b, _text_len(spec, name, max_sequence_length), dtype=torch.long)

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        b = len(prompts)
        with on_host():
            if family == "flux1":
                seq = max_sequence_length or 512
                if "text_encoder_2" in encoders:
                    emb = encoders["text_encoder_2"](ids("text_encoder_2", b)).last_hidden_state
                else:
                    emb = torch.randn(b, seq, joint)
                pooled = (encoders["text_encoder"](ids("text_encoder", b)).pooler_output
                          if "text_encoder" in encoders else torch.randn(b, pooled_dim))
                return {"encoder_hidden_states": emb, "pooled_projections": pooled}
            if family == "sd3":
                if len(encoders) == 3:
                    hid, pools = [], []
                    for name in ("text_encoder", "text_encoder_2"):
                        out = encoders[name](ids(name, b), output_hidden_states=True)
                        hid.append(out.hidden_states[-2])
                        pools.append(out.text_embeds)
                    t5 = encoders["text_encoder_3"](ids("text_encoder_3", b)).last_hidden_state
                    clip = torch.cat(hid, dim=-1)
                    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
                    return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                            "pooled_projections": torch.cat(pools, dim=-1)}
                seq = (77 + max_sequence_length) if max_sequence_length else tl
                return {"encoder_hidden_states": torch.randn(b, seq, joint),
                        "pooled_projections": torch.randn(b, pooled_dim)}
            # flux2: the Qwen3 hidden states of three layers, stacked along the feature axis
            enc = encoders.get("text_encoder")
            if enc is not None:
                layers = spec["text_encoders"]["text_encoder"].get("hidden_states_layers", [9, 18, 27])
                out = enc(ids("text_encoder", b), output_hidden_states=True)
                h = torch.stack([out.hidden_states[k] for k in layers], dim=1)
                return {"encoder_hidden_states": h.permute(0, 2, 1, 3).reshape(b, h.shape[2], -1)}
            return {"encoder_hidden_states": torch.randn(b, max_sequence_length or 512, joint)}

    return encode


def build_adapter(cfg, *, on_host: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  spec: dict | None = None, device: str = "cpu"):
    """The family's adapter around a pipeline built from configs (``cfg``: a ``TrainConfig``) on ``device``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = cfg.family
    spec = spec or component_specs(family, cfg.pretrained_model_name_or_path)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    with on_host():  # the pipeline's text encoders live on the host (see the module docstring)
        encoders = {name: build_module(s, dtype).requires_grad_(False) for name, s in spec["text_encoders"].items()}
    transformer = build_module(spec["transformer"], dtype)
    vae = build_module(spec["vae"], dtype)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # its tables are tiny: keep them real
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(spec.get("scheduler") or {})
    encode = prompt_encoder(family, spec, encoders, transformer.config, cfg.max_sequence_length, on_host)
    kw = dict(resolution=cfg.resolution, guidance_scale=cfg.guidance_scale, device=device, dtype=dtype,
              max_sequence_length=cfg.max_sequence_length, prompt_encoder=encode)
    if family == "flux1":
        from diffusers import FluxPipeline

        from flowbp_train.models.flux import FluxAdapter

        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=encoders.get("text_encoder"), tokenizer=None,
                            text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=None, transformer=transformer)
        adapter = FluxAdapter(pipe, **kw)
    elif family == "sd3":
        from diffusers import StableDiffusion3Pipeline

        from flowbp_train.models.sd3 import SD3Adapter

        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=encoders.get("text_encoder"),
            tokenizer=None, text_encoder_2=encoders.get("text_encoder_2"), tokenizer_2=None,
            text_encoder_3=encoders.get("text_encoder_3"), tokenizer_3=None)
        adapter = SD3Adapter(pipe, **kw)
    elif family == "flux2":
        from diffusers import Flux2KleinPipeline

        from flowbp_train.models.flux2 import Flux2Adapter

        pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoders.get("text_encoder"),
                                  tokenizer=None, transformer=transformer)
        adapter = Flux2Adapter(pipe, **kw)
    else:
        raise ValueError(f"family: the memory planner supports flux1, sd3, flux2 and mini, got {family!r}")
    adapter.host_modules = list(encoders.values())  # what the planner counts as host memory
    return adapter, spec


def build_mini_adapter(cfg):
    """The miniature's adapter from its architecture constants (no weights read)."""
    from flowbp_train.models.mini import MiniAdapter, build_text_encoder, build_transformer

    adapter = MiniAdapter(build_transformer(), build_text_encoder(), guidance_scale=cfg.effective_guidance,
                          device="cpu", dtype=torch.float32)
    adapter.host_modules = []
    return adapter, {"source": "the miniature's architecture (flowbp_train.models.mini)"}


class _Tokens:
    """A tokenizer stand-in: every prompt -> 77 token ids (CLIP's padded length); shapes are what matter.
    ``hf``: a transformers-style dict with ``input_ids`` and ``attention_mask``, else open_clip's tensor."""

    def __init__(self, hf: bool):
        self.hf = hf

    def __call__(self, prompts, **_kw):
        ids = torch.zeros(len(prompts), 77, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if self.hf else ids


class _OpenCLIPLike(torch.nn.Module):
    """transformers' CLIP towers behind open_clip's interface (``visual.image_size``, ``encode_image``,
    ``encode_text``): used for HPSv2 when open_clip is not installed (same widths, depths and parameter
    count as OpenCLIP ViT-H-14)."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

        self.visual = CLIPVisionModelWithProjection(config.vision_config)
        self.visual.image_size = config.vision_config.image_size
        self.text = CLIPTextModelWithProjection(config.text_config)

    def encode_image(self, pixels, normalize: bool = False):
        e = self.visual(pixel_values=pixels).image_embeds
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    def encode_text(self, tokens, normalize: bool = False):
        e = self.text(input_ids=tokens).text_embeds
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e


def clip_config(arch: str):
    from transformers import CLIPConfig

    towers = json.loads((ARCHITECTURES / "rewards.json").read_text())["towers"]
    if arch not in towers:
        raise ValueError(f"reward tower {arch!r} is not shipped; expected one of {', '.join(towers)}")
    t = towers[arch]
    return CLIPConfig(text_config=t["text"], vision_config=t["vision"], projection_dim=t["projection_dim"])


def tiny_clip_config():
    """A CLIP config of a few thousand parameters (tests and CPU smoke runs)."""
    from transformers import CLIPConfig

    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, vocab_size=49408)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
                  image_size=28)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)


def build_reward(cfg, config_override=None):
    """The configured reward with its published architecture and no weights (``reward_kwargs.dtype``
    honoured). ``config_override``: a ``CLIPConfig`` replacing the shipped tower (tests)."""
    name, kw = cfg.reward, dict(cfg.reward_kwargs)
    if name == "mini":
        from flowbp_train.rewards.mini import DigitReward

        return DigitReward()  # the miniature's reward is a small CNN shipped with the package
    if name not in REWARD_TOWERS:
        raise ValueError(f"reward: the memory planner knows the architectures of {', '.join(REWARD_TOWERS)} and "
                         f"mini, got {name!r}")
    dtype = as_dtype(kw.get("dtype", "fp32"), "reward_kwargs.dtype")
    config = config_override or clip_config(REWARD_TOWERS[name])
    with default_dtype(dtype):
        if name == "hpsv2":
            from flowbp_train.rewards.hpsv2 import HPSv2Reward

            tower = _openclip(REWARD_TOWERS[name]) if config_override is None else None
            return HPSv2Reward(model=tower or _OpenCLIPLike(config), tokenizer=_Tokens(hf=False), dtype=dtype)
        from transformers import CLIPModel

        model = CLIPModel(config)
        if name == "pickscore":
            from flowbp_train.rewards.pickscore import PickScoreReward

            return PickScoreReward(model=model, tokenizer=_Tokens(hf=True), dtype=dtype)
        from flowbp_train.rewards.clipscore import CLIPScoreReward

        return CLIPScoreReward(model=model, tokenizer=_Tokens(hf=True), dtype=dtype)


def _openclip(arch: str):
    try:
        import open_clip
    except ImportError:
        return None
    return open_clip.create_model(arch, pretrained=None)
