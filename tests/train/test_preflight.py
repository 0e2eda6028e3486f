"""Every file a run needs is found before anything heavy loads: the model folder and each component's
config and weights, the reward's weight files; the error is one line naming the key the user sets, and
the reward is built before the transformer."""

from __future__ import annotations

import json
import time

import pytest

from flowbp_train.config import ConfigError, from_dict
from flowbp_train.models.files import check_pipeline_files
from flowbp_train.preflight import preflight

from helpers import ROOT

RECIPE = str(ROOT / "recipes" / "flux1" / "flowbp-lagrange.yaml")
FLUX_INDEX = {"_class_name": "FluxPipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer_2": ["transformers", "T5Tokenizer"],
              "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def fake_folder(root, index=FLUX_INDEX):
    """The file layout of a diffusers folder (file names only: the checks never read weights)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps(index))
    for name, (_, cls) in ((k, v) for k, v in index.items() if not k.startswith("_") and v[1] is not None):
        d = root / name
        d.mkdir()
        if "Tokenizer" in cls:
            (d / "tokenizer.json").write_text("{}")
        elif "Scheduler" in cls:
            (d / "scheduler_config.json").write_text("{}")
        else:
            (d / "config.json").write_text("{}")
            (d / "model.safetensors").write_bytes(b"")
    return root


def test_a_complete_folder_passes_and_each_defect_is_named(tmp_path):
    good = fake_folder(tmp_path / "good")
    assert check_pipeline_files(str(good), "FluxPipeline", family="flux1") == good

    bad = fake_folder(tmp_path / "no-weights")
    (bad / "text_encoder_2" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"pretrained_model_name_or_path: .*text_encoder_2.*weights"):
        check_pipeline_files(str(bad), "FluxPipeline", family="flux1")

    sharded = fake_folder(tmp_path / "sharded")
    (sharded / "transformer" / "model.safetensors").unlink()
    (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                        "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}))
    (sharded / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="1 of the 2 weight shards"):
        check_pipeline_files(str(sharded), "FluxPipeline", family="flux1")

    with pytest.raises(ValueError, match="holds a FluxPipeline .* family=sd3 loads a StableDiffusion3Pipeline"):
        check_pipeline_files(str(good), "StableDiffusion3Pipeline", family="sd3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        check_pipeline_files(str(tmp_path / "empty"), "FluxPipeline", family="flux1")
    with pytest.raises(FileNotFoundError, match="local folder not found"):
        check_pipeline_files("/no/such/folder", "FluxPipeline", family="flux1")


def test_sd3_without_t5_is_complete(tmp_path):
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder_3": [None, None], "tokenizer_3": [None, None]}
    assert check_pipeline_files(str(fake_folder(tmp_path / "sd3", index)), "StableDiffusion3Pipeline", family="sd3")


def _cfg(tmp_path, **kw):
    values = dict(family="flux1", pretrained_model_name_or_path=str(fake_folder(tmp_path / "model")),
                  reward="hpsv2", output_dir=str(tmp_path / "out"), device="cpu", report_to="none")
    values.update(kw)
    return from_dict(values)


def test_missing_reward_weights_name_the_cli_key_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import flowbp_train.models as models

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the reward's files were checked")

    monkeypatch.setattr(models, "build_adapter", must_not_load)
    t0 = time.perf_counter()
    cases = ({"reward_kwargs": {"checkpoint_path": str(tmp_path / "nope.pt")}},
             {"reward": "pickscore", "reward_kwargs": {"model_path": str(tmp_path / "no-clip")}},
             {"reward": "imagereward", "reward_kwargs": {"checkpoint_path": str(tmp_path / "ImageReward.pt")}})
    for k, kw in enumerate(cases):
        cfg = _cfg(tmp_path / f"case{k}", **kw)
        with pytest.raises(ConfigError, match=r"^reward_kwargs\.(checkpoint_path|model_path): ") as info:
            preflight(cfg)
        assert "\n" not in str(info.value) and "Pass reward_kwargs." in str(info.value)
        from flowbp_train.trainer import Trainer

        with pytest.raises(ConfigError, match=r"^reward_kwargs\."):
            Trainer(cfg)
    assert time.perf_counter() - t0 < 30
    with pytest.raises(ConfigError, match="^reward: unknown reward 'nope'"):
        preflight(_cfg(tmp_path / "u", reward="nope"))
    with pytest.raises(ConfigError, match="^pretrained_model_name_or_path: .* no model_index.json"):
        preflight(_cfg(tmp_path / "m", pretrained_model_name_or_path=str(tmp_path)), reward=False)


def test_the_cli_reports_a_missing_component_in_one_line(tmp_path, capsys):
    from flowbp_train.cli import train_main

    folder = fake_folder(tmp_path / "model")
    (folder / "vae" / "config.json").unlink()
    code = train_main([RECIPE, f"pretrained_model_name_or_path={folder}",
                       "reward=pickscore", f"reward_kwargs.model_path={folder}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("flowbp-train: error: pretrained_model_name_or_path: ") and "vae" in err


def test_a_cached_model_id_is_checked_in_its_snapshot(tmp_path, monkeypatch):
    """A model id resolves to its snapshot in the Hugging Face cache (no network); a partial download
    there is reported like a local folder's, and an uncached id fails at once offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-flux"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = fake_folder(repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_pipeline_files("acme/tiny-flux", "FluxPipeline", family="flux1") == snapshot
    (snapshot / "transformer" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="transformer .* incomplete"):
        check_pipeline_files("acme/tiny-flux", "FluxPipeline", family="flux1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache.*hf download acme/other"):
        check_pipeline_files("acme/other", "FluxPipeline", family="flux1")


def test_flux2_dev_with_the_published_processor_needs_torchvision(tmp_path, monkeypatch):
    """The published FLUX.2-dev tokenizer is a PixtralProcessor, which transformers builds only with
    torchvision: without it the check says so in one line, before anything loads."""
    import importlib.util

    from flowbp_train.models.flux2_dev import Flux2DevAdapter

    index = {"_class_name": "Flux2Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"],
             "tokenizer": ["transformers", "PixtralProcessor"],
             "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}
    folder = fake_folder(tmp_path / "dev", index)
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    real = importlib.util.find_spec

    def without(name, *a):
        return None if name == "torchvision" else real(name, *a)

    def with_it(name, *a):
        return object() if name == "torchvision" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(ValueError, match="^pretrained_model_name_or_path: .*PixtralProcessor.*torchvision"):
        Flux2DevAdapter.check_files(str(folder))
    monkeypatch.setattr(importlib.util, "find_spec", with_it)
    assert Flux2DevAdapter.check_files(str(folder)) == folder
