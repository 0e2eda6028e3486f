"""Build a family's modules, adapter and reward from configuration files only: no weights are read.

The architectures come from the model folder's ``model_index.json`` and ``<component>/config.json`` files
when ``pretrained_model_name_or_path`` is a local folder, otherwise from the published architectures
shipped in ``flowbp_train/memory/architectures/`` (written from the public model descriptions; their
``_note`` says what to verify). Called inside ``FakeTensorMode`` every parameter is a fake tensor (shape,
dtype, no storage); outside it, the same code builds real randomly initialised modules (the tests'
real-tensor reference). Modules are built directly in the run's dtype, as ``from_pretrained(torch_dtype=)``
leaves them. The text encoders are built in host memory, as a real run loads the pipeline on the CPU; the
adapter's own prompt path then runs (``FlowAdapter._encode_cached`` places them on the device to encode and
the trainer offloads them): only the pipeline's ``encode_prompt`` is replaced, by :func:`pipeline_encoder`,
which calls the same encoders on token ids of the padded length (no tokenizer is needed for the shapes).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
#: families whose pipeline's ``encode_prompt`` has a stand-in here that runs the text encoders; any other
#: family's architecture file declares the shapes its ``encode_prompt`` returns (``prompt_outputs``)
ENCODER_STAND_INS = ("flux1", "sd3", "flux2")


def shipped_architectures(folder: Path | None = None) -> dict[str, str]:
    """``family -> file name`` of every architecture file in ``folder`` (default: the shipped
    ``architectures/``) that names its ``family``: a new family's file is picked up as it is added."""
    found: dict[str, str] = {}
    for path in sorted((folder or ARCHITECTURES).glob("*.json")):
        try:
            family = json.loads(path.read_text()).get("family")
        except (OSError, ValueError) as exc:
            raise ValueError(f"architectures: cannot read {path.name} ({exc})") from None
        if family is None:  # rewards.json: the reward towers
            continue
        if family in found:
            raise ValueError(f"architectures: {found[family]} and {path.name} both describe family {family!r}")
        found[family] = path.name
    return found


#: family -> the shipped architecture file (the published model the recipes target)
FAMILY_FILES = shipped_architectures()
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
    """The specs of a run: the local model folder's configs when there is one, else the shipped ones (a
    model id, or none). A local path that is no folder is an error, not a reason to plan another model."""
    if pretrained and not Path(pretrained).is_dir() and _looks_local(str(pretrained)):
        raise ValueError(f"pretrained_model_name_or_path: {pretrained} is not a model folder (expected a local "
                         f"diffusers folder or a model id such as black-forest-labs/FLUX.1-dev)")
    if pretrained and Path(pretrained).is_dir():
        spec = folder_specs(Path(pretrained))
        shipped = load_architecture(family) if family in FAMILY_FILES else {}
        for name, enc in spec["text_encoders"].items():  # padded lengths the pipelines use
            enc.setdefault("max_length", shipped.get("text_encoders", {}).get(name, {}).get("max_length", 77))
            if "hidden_states_layers" in shipped.get("text_encoders", {}).get(name, {}):
                enc["hidden_states_layers"] = shipped["text_encoders"][name]["hidden_states_layers"]
        spec.setdefault("text_len", shipped.get("text_len"))
        if "prompt_outputs" in shipped:  # what the family's encode_prompt returns, in config terms
            spec.setdefault("prompt_outputs", shipped["prompt_outputs"])
            spec.setdefault("pipeline", shipped.get("pipeline"))
        return spec
    spec = load_architecture(family)
    spec["source"] = f"published architecture ({FAMILY_FILES[family]})"
    return spec


def _looks_local(name: str) -> bool:
    """A path on this machine rather than a hub id (``owner/name``: one slash, no leading dot or slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or Path(name).exists()


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


def pipeline_encoder(family: str, spec: dict, encoders: dict[str, torch.nn.Module], transformer_config,
                     max_sequence_length: int | None, on_host: Callable[[], contextlib.AbstractContextManager]):
    """A stand-in for the family pipeline's ``encode_prompt`` (same keywords, same return tuple): the text
    encoders run where they are (the device once the adapter has placed them) on zero token ids of each
    encoder's padded length, as the pipeline calls them; without encoders in the folder, random embeddings
    of the transformer's text width. The outputs are copied to host memory before they are returned: the
    adapter keeps its prompt cache on the CPU, and on a GPU the device output is freed once copied (the
    device peak is the same, no device allocation happens in between)."""
    tl = spec.get("text_len") or 512
    joint = getattr(transformer_config, "joint_attention_dim", None)  # the stand-in families' text width
    pooled_dim = getattr(transformer_config, "pooled_projection_dim", None)

    def ids(name: str, b: int) -> torch.Tensor:
        return torch.zeros(b, _text_len(spec, name, max_sequence_length), dtype=torch.long)

    def to_host(*tensors):
        with on_host():
            return tuple(t.clone() for t in tensors)

    def run(prompts: list[str]) -> tuple[torch.Tensor, ...]:
        b = len(prompts)
        if family == "flux1":
            seq = max_sequence_length or 512
            if "text_encoder_2" in encoders:
                emb = encoders["text_encoder_2"](ids("text_encoder_2", b), output_hidden_states=False)[0]
            else:
                emb = torch.randn(b, seq, joint)
            pooled = (encoders["text_encoder"](ids("text_encoder", b), output_hidden_states=False).pooler_output
                      if "text_encoder" in encoders else torch.randn(b, pooled_dim))
            return emb, pooled
        if family == "sd3":
            if len(encoders) == 3:
                hid, pools = [], []
                for name in ("text_encoder", "text_encoder_2"):
                    out = encoders[name](ids(name, b), output_hidden_states=True)
                    hid.append(out.hidden_states[-2])
                    pools.append(out[0])
                    del out
                t5 = encoders["text_encoder_3"](ids("text_encoder_3", b))[0]
                clip = torch.cat(hid, dim=-1)
                clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
                return torch.cat([clip, t5], dim=-2), torch.cat(pools, dim=-1)
            seq = (77 + max_sequence_length) if max_sequence_length else tl
            return torch.randn(b, seq, joint), torch.randn(b, pooled_dim)
        # flux2: the Qwen3 hidden states of three layers, stacked along the feature axis (the pipeline calls
        # the causal LM with output_hidden_states=True and use_cache=False; its logits are computed too)
        enc = encoders.get("text_encoder")
        if enc is not None:
            layers = spec["text_encoders"]["text_encoder"].get("hidden_states_layers", [9, 18, 27])
            tok = ids("text_encoder", b)
            out = enc(input_ids=tok, attention_mask=torch.ones_like(tok), output_hidden_states=True, use_cache=False)
            h = torch.stack([out.hidden_states[k] for k in layers], dim=1)
            del out
            return (h.permute(0, 2, 1, 3).reshape(b, h.shape[2], -1),)
        return (torch.randn(b, max_sequence_length or 512, joint),)

    def declared(prompts: list[str]) -> tuple:
        """A family without a stand-in: the outputs its architecture file declares, ``null`` or a shape
        whose ``"batch"`` / ``"max_sequence_length"`` entries are filled in (random embeddings)."""
        sizes = {"batch": len(prompts), "max_sequence_length": max_sequence_length or tl}

        def size(d):  # an int, "batch", "max_sequence_length" or a key of the transformer's config
            return d if isinstance(d, int) else sizes[d] if d in sizes else int(getattr(transformer_config, d))

        return tuple(None if shape is None else torch.randn(*[size(d) for d in shape])
                     for shape in spec["prompt_outputs"])

    def encode_prompt(prompt, *_args, **_kw):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if family not in ENCODER_STAND_INS:
            outs = declared(prompts)
            return tuple(None if o is None else to_host(o)[0] for o in outs)
        outs = to_host(*run(prompts))
        if family == "flux1":  # (prompt_embeds, pooled_prompt_embeds, text_ids)
            return outs[0], outs[1], None
        if family == "sd3":  # (prompt_embeds, negative, pooled_prompt_embeds, negative pooled)
            return outs[0], None, outs[1], None
        return outs[0], None  # flux2: (prompt_embeds, text_ids)

    return encode_prompt


def build_adapter(cfg, *, on_host: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  spec: dict | None = None, device: str = "cpu", to_device: Callable | None = None):
    """The family's adapter around a pipeline built from configs (``cfg``: a ``TrainConfig``) on ``device``.

    Every module is built inside ``on_host()``, as ``from_pretrained`` builds and loads on the CPU (what
    a module computes while it is built, such as SD3's positional table in float64, stays there); the
    adapter then places the transformer and the VAE on the device: ``to_device(tensors)`` is told which
    (the text encoders come when the adapter encodes)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    family = cfg.family
    spec = spec or component_specs(family, cfg.pretrained_model_name_or_path)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    with on_host():  # the pipeline is loaded on the host; the adapter places the encoders to encode
        encoders = {name: build_module(s, dtype).requires_grad_(False) for name, s in spec["text_encoders"].items()}
    with on_host():
        transformer = build_module(spec["transformer"], dtype)
        vae = build_module(spec["vae"], dtype)
    with torch._subclasses.fake_tensor.unset_fake_temporarily():  # its tables are tiny: keep them real
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(spec.get("scheduler") or {})
    encode_prompt = pipeline_encoder(family, spec, encoders, transformer.config, cfg.max_sequence_length, on_host)
    kw = dict(resolution=cfg.resolution, guidance_scale=cfg.guidance_scale, device=device, dtype=dtype,
              max_sequence_length=cfg.max_sequence_length)
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
        pipe, adapter = _generic_adapter(family, spec, transformer, vae, scheduler, encoders, kw)
    pipe.encode_prompt = encode_prompt  # the adapter's own prompt path runs (placement, cache, offload)
    if to_device is not None:  # placed by the adapter's constructor (place_module)
        to_device([t for m in (transformer, vae) for t in (*m.parameters(), *m.buffers())])
    return adapter, spec


def check_spec(family: str, spec: dict) -> None:
    """What the planner needs of a family without its own stand-in (one line naming the file's key)."""
    if family in ENCODER_STAND_INS:
        return
    where = spec.get("source", family)
    outs = spec.get("prompt_outputs")
    if not isinstance(spec.get("pipeline"), str):
        raise ValueError(f"family: {where} must name its diffusers pipeline class (key 'pipeline')")
    if not (isinstance(outs, list) and outs and all(
            o is None or (isinstance(o, list) and all(isinstance(d, (int, str)) for d in o)) for o in outs)):
        raise ValueError(f"family: {where} must declare prompt_outputs, the shapes its pipeline's encode_prompt "
                         f"returns (a list of null or [\"batch\", length or \"max_sequence_length\", width or "
                         f"a key of the transformer's config])")


def _generic_adapter(family, spec, transformer, vae, scheduler, encoders, kw):
    """A family with no code here: its diffusers pipeline (``spec["pipeline"]``) from the built components
    (every other component None), wrapped in the adapter the model registry names for it."""
    import inspect

    import diffusers

    from flowbp_train.models import adapter_class

    check_spec(family, spec)
    cls = getattr(diffusers, spec["pipeline"], None)
    if cls is None:
        raise ValueError(f"family: diffusers {diffusers.__version__} has no pipeline {spec['pipeline']!r}")
    have = {"transformer": transformer, "vae": vae, "scheduler": scheduler, **encoders}
    names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
    pipe = cls(**{n: have.get(n) for n in names})
    entry = adapter_class(family)
    if not isinstance(entry, type):
        raise ValueError(f"family: the {family!r} adapter is registered as a factory; the planner needs its class")
    return pipe, entry(pipe, **kw)


def build_mini_adapter(cfg):
    """The miniature's adapter from its architecture constants (no weights read)."""
    from flowbp_train.models.mini import MiniAdapter, build_text_encoder, build_transformer

    adapter = MiniAdapter(build_transformer(), build_text_encoder(), guidance_scale=cfg.effective_guidance,
                          device="cpu", dtype=torch.float32)
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

        # the miniature's reward is a small CNN whose weights ship with the package: loaded for real (a
        # few KiB), also inside a fake run, which only needs its activations to be fake
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return DigitReward()
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
