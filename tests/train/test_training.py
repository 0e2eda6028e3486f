"""The loop on tiny random pipelines: every method with both executors, LoRA and full fine-tuning,
bf16, non-finite handling, resume exactness, atomic checkpoints, and the saved LoRA in diffusers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowbp_kernels import METHODS
from flowbp_train import checkpoint as ckpt
from flowbp_train.config import from_dict
from flowbp_train.rundir import LOCK_FILE
from flowbp_train.trainer import Trainer, train

from helpers.pipelines import PIPELINES, NaNReward, PixelReward, tiny_adapter

# small windows keep every method valid with 6 steps (Lagrange needs >= 3 steps per window)
SMALL = {"flowbp-sparse": {"num_active": 2}, "flowbp-bridge": {"num_active": 3}, "refl": {"last_n": 3},
         "drtune": {"num_active": 2}, "draft-k": {"num_active": 2}}


def config(tmp_path, family="sd3", method="flowbp-lagrange", **kw):
    values = dict(family=family, pretrained_model_name_or_path="tiny", method=method,
                  method_options=SMALL.get(method, {}), num_steps=6, resolution=16, train_batch_size=2,
                  max_train_steps=2, learning_rate=1e-3, loss="neg", mixed_precision="no", device="cpu", rank=4,
                  output_dir=str(tmp_path / "out"), report_to="none", num_sample_images=0, progress_bar=False,
                  checkpointing_steps=1000, prompts=["a cat", "a dog", "a red bus"])
    values.update(kw)
    return from_dict(values)


def lora_params(tr):
    return {n: p for n, p in tr.named_parameters() if "lora" in n}


def run_steps(tmp_path, family, method, executor, steps=2, adapter_kw=None, **kw):
    cfg = config(tmp_path, family, method, executor=executor, max_train_steps=steps, **kw)
    trainer = Trainer(cfg, adapter=tiny_adapter(family, **(adapter_kw or {})), reward=PixelReward())
    before = {n: p.detach().clone() for n, p in lora_params(trainer.adapter.transformer).items()}
    records = [trainer.training_step() for _ in range(steps)]
    return trainer, records, before


def check_trained(trainer, records, before):
    assert all(not r["skipped"] and math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    lora = lora_params(trainer.adapter.transformer)
    assert lora and all(p.requires_grad for p in lora.values())
    grad_sq = sum(float(p.grad.square().sum()) for p in lora.values() if p.grad is not None)
    assert grad_sq > 0  # the last step's LoRA gradient (kept after the optimizer step)
    assert any(not torch.equal(before[n], p) for n, p in lora.items())
    base = [p for n, p in trainer.adapter.transformer.named_parameters() if "lora" not in n]
    assert all(not p.requires_grad and p.grad is None for p in base)


@pytest.mark.parametrize("executor", ["streaming", "retain"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_sd3(tmp_path, method, executor):
    check_trained(*run_steps(tmp_path, "sd3", method, executor))


@pytest.mark.parametrize("family, method, executor", [
    ("flux1", "flowbp-lagrange", "streaming"), ("flux1", "flowbp-bridge", "retain"),
    ("flux1", "draft-lv", "streaming"), ("flux2", "flowbp-lagrange", "retain"),
    ("flux2", "leapalign", "streaming"), ("flux2", "flowbp-sparse", "streaming"),
])
def test_methods_train_flux_families(tmp_path, family, method, executor):
    check_trained(*run_steps(tmp_path, family, method, executor))


def test_streaming_and_retain_give_the_same_step(tmp_path):
    recs = {ex: run_steps(tmp_path / ex, "flux1", "flowbp-lagrange", ex, steps=1)[1][0]
            for ex in ("streaming", "retain")}
    assert recs["streaming"]["loss"] == pytest.approx(recs["retain"]["loss"], rel=1e-6)
    assert recs["streaming"]["grad_norm"] == pytest.approx(recs["retain"]["grad_norm"], rel=1e-4)


def test_full_finetuning_and_bf16(tmp_path):
    trainer, records, _ = run_steps(tmp_path / "ft", "sd3", "flowbp-sparse", "streaming", rank=0)
    params = list(trainer.adapter.transformer.parameters())
    assert all(p.requires_grad for p in params) and records[-1]["grad_norm"] > 0
    trainer, records, before = run_steps(tmp_path / "bf16", "flux2", "flowbp-lagrange", "streaming",
                                         mixed_precision="bf16", adapter_kw={"dtype": torch.bfloat16})
    assert trainer.adapter.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_params(trainer.adapter.transformer).values())
    check_trained(trainer, records, before)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    cfg = config(tmp_path, max_train_steps=5, max_nonfinite_steps=2)
    trainer = Trainer(cfg, adapter=tiny_adapter("sd3"), reward=NaNReward())
    before = {n: p.detach().clone() for n, p in lora_params(trainer.adapter.transformer).items()}
    with pytest.warns(RuntimeWarning, match="step 1 skipped"):
        rec = trainer.training_step()
    assert rec["skipped"] and rec["loss"] is None
    assert all(torch.equal(before[n], p) for n, p in lora_params(trainer.adapter.transformer).items())
    with pytest.warns(RuntimeWarning), pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
        trainer.training_step()


def test_resume_gives_exactly_the_same_losses(tmp_path):
    kw = dict(use_ema=True, checkpointing_steps=2, method="flowbp-bridge", method_options={"num_active": 3})
    full = train(config(tmp_path / "a", max_train_steps=4, **kw), adapter=tiny_adapter("sd3"), reward=PixelReward())
    train(config(tmp_path / "b", max_train_steps=2, **kw), adapter=tiny_adapter("sd3"), reward=PixelReward())
    resumed = train(config(tmp_path / "b", max_train_steps=4, resume_from_checkpoint="latest", **kw),
                    adapter=tiny_adapter("sd3"), reward=PixelReward())
    assert [r["step"] for r in resumed.records] == [3, 4]
    # bit-exact: same process, same thread count, same operations in the same order; the checkpoint
    # restores weights, optimizer state and every RNG stream by copy
    assert resumed.losses == full.losses[2:]
    assert [r["active"] for r in resumed.records] == [r["active"] for r in full.records[2:]]


def test_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, max_train_steps=4, checkpointing_steps=2, checkpoints_total_limit=1)
    trainer = Trainer(cfg, adapter=tiny_adapter("sd3"), reward=PixelReward())
    for _ in range(2):
        trainer.training_step()
    first = trainer.save_checkpoint()
    at_step_2 = {n: p.detach().clone() for n, p in lora_params(trainer.adapter.transformer).items()}
    for _ in range(2):
        trainer.training_step()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise KeyboardInterrupt("killed while saving")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(torch, "save", real_save)
    out = tmp_path / "out"
    assert ckpt.list_checkpoints(out) == [first]
    # no partial folder (the lock file is the live trainer's)
    assert sorted(p.name for p in out.iterdir() if p.name not in ("logs", LOCK_FILE)) == ["checkpoint-2"]
    fresh = Trainer(config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest"),
                    adapter=tiny_adapter("sd3"), reward=PixelReward())
    fresh.resume()
    assert fresh.global_step == 2
    loaded = lora_params(fresh.adapter.transformer)
    assert loaded.keys() == at_step_2.keys()
    assert all(torch.equal(loaded[n], at_step_2[n]) for n in loaded)  # bit-exact: a file round trip
    assert any(not torch.equal(loaded[n], p) for n, p in lora_params(trainer.adapter.transformer).items())


@pytest.mark.parametrize("family", ["flux1", "sd3", "flux2", "flux2-dev", "z-image"])
def test_saved_lora_loads_in_the_pipeline_at_its_trained_scale(tmp_path, family):
    """rank 4 with lora_alpha 16 (scale 4): the final export (EMA weights) loads with the stock pipeline's
    load_lora_weights and reproduces the trained velocity; a checkpoint holds the raw and the EMA LoRA,
    labelled, and flowbp-eval's loader takes the EMA one by default."""
    from flowbp_train.evaluate import _load_lora
    from flowbp_train.weights import EMA_LORA_FILE, LORA_FILE, read_lora_metadata

    cfg = config(tmp_path, family, max_train_steps=2, learning_rate=5e-2, num_sample_images=1, sample_steps=3,
                 lora_alpha=16.0, use_ema=True, ema_decay=0.5, checkpointing_steps=2)
    trainer = Trainer(cfg, adapter=tiny_adapter(family), reward=PixelReward())
    trainer.train()
    out = tmp_path / "out"
    for name in (LORA_FILE, "README.md", "config.yaml", "samples/sample_00.png", f"checkpoint-2/{EMA_LORA_FILE}"):
        assert (out / name).is_file(), name
    assert read_lora_metadata(out / LORA_FILE)[0]["lora_alpha"] == 16.0
    assert [read_lora_metadata(out / "checkpoint-2" / f)[1]["weights"] for f in (LORA_FILE, EMA_LORA_FILE)] == [
        "raw", "ema"]
    fresh = tiny_adapter(family)  # same seed: the same base weights
    batch = fresh.encode_prompts(["a cat"])
    sig = fresh.sigmas(4)
    x = fresh.initial_noise(1, generator=torch.Generator().manual_seed(1))

    def velocity(ad):
        with torch.no_grad():
            return ad.velocity_fn(batch, sig)(x, 1)

    v_base, v_raw = velocity(fresh), velocity(trainer.adapter)
    with trainer.ema.swapped_in():
        v_ema = velocity(trainer.adapter)
    fresh.pipeline.load_lora_weights(str(out))
    v_loaded = velocity(fresh)
    assert not torch.allclose(v_loaded, v_base, atol=1e-6)
    # fp32 throughout; the loaded LoRA runs the same layers, so agreement is to rounding (velocities ~1)
    assert torch.allclose(v_loaded, v_ema, atol=1e-5), float((v_loaded - v_ema).abs().max())
    for weights, want in (("auto", v_ema), ("raw", v_raw)):
        ad = tiny_adapter(family)
        info = _load_lora(ad, str(out / "checkpoint-2"), weights)
        assert info["lora_weights"] == ("ema" if weights == "auto" else "raw") and info["step"] == 2
        assert torch.allclose(velocity(ad), want, atol=1e-5), weights


def test_draft_lv_noise_is_drawn_from_the_rank_generator(tmp_path, monkeypatch):
    import flowbp_train.trainer as T

    seen = []
    real = T.reward_backprop

    def spy(*a, **k):
        seen.append((k["plan"], k["noise_generator"]))
        return real(*a, **k)

    monkeypatch.setattr(T, "reward_backprop", spy)
    trainer, records, _ = run_steps(tmp_path, "sd3", "draft-lv", "streaming", steps=1)
    assert seen and seen[0][1] is trainer.generators["noise"] and seen[0][0].noise_seed is None
    assert records[0]["loss"] is not None


def test_cli_trains_with_registered_adapter_and_reward(tmp_path):
    from flowbp_train.cli import train_main
    from flowbp_train.models import register_adapter
    from flowbp_train.rewards import register_reward

    register_adapter("tiny-flux2", lambda path, **kw: tiny_adapter("flux2", guidance_scale=kw.get("guidance_scale")))
    from flowbp_train.rewards import Reward

    class RegisteredPixelReward(Reward):  # the registry's interface around the same pixel reward
        name = "tiny-pixel"

        def __init__(self):
            super().__init__()
            self.freeze()

        def _score(self, images, prompts):
            return PixelReward().score(images, prompts)

    register_reward("tiny-pixel", RegisteredPixelReward, overwrite=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("family: tiny-flux2\nmethod: flowbp-lagrange\nnum_steps: 6\nresolution: 16\nreward: tiny-pixel\n"
                      "loss: neg\nmixed_precision: 'no'\ndevice: cpu\nrank: 2\nnum_sample_images: 1\nsample_steps: 2\n")
    out = tmp_path / "out"
    assert train_main([str(recipe), "pretrained_model_name_or_path=tiny", f"output_dir={out}", "max_train_steps=2",
                       "report_to=tensorboard", "progress_bar=false"]) == 0
    lines = [json.loads(x) for x in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    for key in ("loss", "reward", "weights", "grad_norm", "grad_norm_clipped", "d_j", "d_0", "step_time",
                "peak_memory_gb", "node_grad_norms"):
        assert lines[-1][key] is not None, key
    assert lines[-1]["grad_norm_clipped"] <= max(1.0, lines[-1]["grad_norm"]) + 1e-6
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "logs").iterdir())
    assert (out / "checkpoint-2" / ckpt.STATE_FILE).is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    assert PIPELINES  # the tiny factories are shared with the adapter tests


@pytest.mark.parametrize("family", ["flux2-dev", "z-image"])
def test_every_method_trains_the_added_families(tmp_path, family):
    """FLUX.2-dev and Z-Image: each method with both executors (one step each: a step runs the method's
    whole plan), LoRA in fp32; then full fine-tuning and a bf16 transformer with fp32 LoRA weights."""
    for method in METHODS:
        for executor in ("streaming", "retain"):
            check_trained(*run_steps(tmp_path / f"{method}-{executor}", family, method, executor, steps=1))
    trainer, records, _ = run_steps(tmp_path / "ft", family, "flowbp-lagrange", "streaming", steps=1, rank=0)
    assert all(p.requires_grad for p in trainer.adapter.transformer.parameters()) and records[-1]["grad_norm"] > 0
    trainer, records, before = run_steps(tmp_path / "bf16", family, "flowbp-lagrange", "streaming", steps=1,
                                         mixed_precision="bf16", adapter_kw={"dtype": torch.bfloat16})
    assert trainer.adapter.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_params(trainer.adapter.transformer).values())
    check_trained(trainer, records, before)
