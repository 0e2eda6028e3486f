"""The training loop: cached rollout -> method plan -> executor -> clip -> AdamW -> EMA -> log/checkpoint.

One step (shared/design/ALGORITHM.md sections 2-5): sample prompts and noise, roll the model out without
gradient caching every latent and velocity, draw the method's plan from the index sampler (its own CPU
generator, seeded identically on every rank; DRaFT-LV's re-noising noise comes from each rank's own
noise generator), let ``flowbp_kernels.reward_backprop`` accumulate the parameter gradients, then clip
(default 1.0), step AdamW and the EMA. A non-finite loss or gradient skips the step;
``max_nonfinite_steps`` in a row stop the run. A reward with ``terms(images, prompts)`` has each
term's batch mean on the sample logged as ``reward_<term>``. Under torchrun the transformer is wrapped
by DDP or sharded by FSDP2 (``flowbp_train.distributed``); the executor's node backwards run under
``no_sync`` but the last, so gradients are reduced once per step. Around the loop, each concern has its own module:
``preflight`` (every file, before anything loads; the reward is built before the model), ``rundir``
(the output folder's lock, what a resume may change), ``checkpoint`` (atomic, verified checkpoints),
``weights`` (LoRA / transformer files, the model card), ``ema``, ``tracking`` (the per-step log).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowbp_kernels import NonFiniteLossError, get_method, reward_backprop, rollout
from flowbp_train import checkpoint as ckpt
from flowbp_train import distributed as D
from flowbp_train import rundir
from flowbp_train import weights as W
from flowbp_train.config import TrainConfig, check_lora_targets, dump_yaml, load_prompts, validate
from flowbp_train.ema import EMA
from flowbp_train.models.base import FlowAdapter, encoded_where
from flowbp_train.preflight import preflight
from flowbp_train.tracking import Tracker, step_record

#: prompts encoded per text-encoder call at the start of a run (bounds the encoders' activation memory)
PROMPT_CHUNK = 8


def add_trainable(adapter: FlowAdapter, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """LoRA via peft (``rank > 0``; the family's default targets, ``adapter.lora_targets``, unless
    ``lora_target_modules``) or full fine-tuning (``rank: 0``). Frozen modules are frozen; LoRA weights
    train in fp32."""
    tr = adapter.transformer
    for m in adapter.frozen_modules():
        m.requires_grad_(False)
    if cfg.rank == 0:
        tr.requires_grad_(True)
    else:
        from peft import LoraConfig

        tr.requires_grad_(False)
        targets = list(cfg.lora_target_modules or adapter.lora_targets(tr))
        tr.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.effective_lora_alpha, lora_dropout=cfg.lora_dropout,
                                  init_lora_weights="gaussian", target_modules=targets))
        for p in tr.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    params = [p for p in tr.parameters() if p.requires_grad]
    if not params:
        raise ValueError("lora_target_modules: no module of the transformer matched; nothing to train")
    return params


def _scalar(t) -> float:
    """A norm as a float (FSDP2 returns a DTensor)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-step records (also in ``logs/train_log.jsonl``)."""

    output_dir: Path
    global_step: int
    records: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float | None]:
        return [r["loss"] for r in self.records]


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the adapter, reward, optimizer and state of one run. ``adapter`` / ``reward`` may be given
    (tests, notebooks); otherwise they are built from the config."""

    def __init__(self, cfg: TrainConfig, *, adapter: FlowAdapter | None = None, reward=None):
        self.cfg = validate(cfg)
        self.dist = D.process_state(cfg.device)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.resume_changes: dict[str, tuple] = {}
        self._release = lambda: None
        try:  # rank 0 locks output_dir (released by close(), or when the Trainer is dropped); all fail if busy
            self._release = rundir.claim(self, self.out, self.dist)
            self._resume_from = self._check_resume()  # before any model loads
            self._setup(cfg, adapter, reward)
        except BaseException:
            self.close()
            raise

    def _check_resume(self) -> tuple[Path, tuple[dict, dict]] | None:
        """The checkpoint to resume, verified on every rank and compared with this config (before any
        model loads); None for a fresh start."""
        found = rundir.find_resume(self.out, self.cfg, self.dist)
        if found is None:
            return None
        folder, verified, self.resume_changes = found
        return folder, verified

    def close(self) -> None:
        """Release the output_dir lock (``train`` does it at the end; for a Trainer driven by hand)."""
        self._release()

    def _setup(self, cfg: TrainConfig, adapter: FlowAdapter | None, reward) -> None:
        self.device = self.dist.device if adapter is None else adapter.device
        self.method = get_method(cfg.method, **cfg.method_options)
        self.prompts = D.shard_prompts(load_prompts(cfg.prompts), self.dist)
        self.loss_spec = "neg" if cfg.loss == "neg" else ("hinge", cfg.loss_margin)
        if adapter is not None:  # a given model: its LoRA targets before any other work
            check_lora_targets(adapter.transformer, cfg.lora_target_modules if cfg.rank else None)
        preflight(cfg, model=adapter is None, reward=reward is None)  # every file, before any weight loads
        self.tracker = Tracker(cfg, self.out, self.is_main)  # fails early on a missing wandb
        bf16 = cfg.mixed_precision == "bf16"
        self.latent_dtype = torch.bfloat16 if bf16 else torch.float32
        if reward is None:  # the reward first: its failures cost seconds, the transformer's tens of GB
            from flowbp_train.rewards import get_reward

            reward = get_reward(cfg.reward, **cfg.reward_kwargs)
        if isinstance(reward, torch.nn.Module):
            reward.to(self.device).requires_grad_(False).eval()
        self.reward = reward
        if adapter is None:
            from flowbp_train.models import build_adapter

            adapter = build_adapter(cfg.family, cfg.pretrained_model_name_or_path, resolution=cfg.resolution,
                                    guidance_scale=cfg.guidance_scale, device=self.device,
                                    dtype=self.latent_dtype, revision=cfg.revision,
                                    max_sequence_length=cfg.max_sequence_length)
            check_lora_targets(adapter.transformer, cfg.lora_target_modules if cfg.rank else None)
        self.adapter = adapter
        if cfg.offload_text_encoders:  # encode every prompt of this rank once, then free the encoders
            self._encode_all_prompts(adapter)
        random.seed(cfg.seed)  # LoRA initialisation (and anything else on the global RNGs) per seed
        torch.manual_seed(cfg.seed)
        add_trainable(adapter, cfg)
        if cfg.gradient_checkpointing:
            adapter.enable_gradient_checkpointing()
        if cfg.vae_slicing and hasattr(getattr(adapter, "vae", None), "enable_slicing"):
            adapter.vae.enable_slicing()
        self.strategy = cfg.distributed_strategy if self.world_size > 1 else "none"
        self.model = D.wrap_model(adapter.transformer, self.strategy, self.dist)
        adapter.set_forward_module(self.model)  # DDP: velocity functions call the wrapper
        # after sharding: FSDP2 replaces the parameters by DTensors
        self.params = [p for p in adapter.transformer.parameters() if p.requires_grad]
        self.no_sync = D.no_sync_context(self.model, self.strategy, self.dist)
        self.all_finite = (lambda ok: D.all_ranks_ok(ok, self.dist)) if self.world_size > 1 else None
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.ema = EMA(self.params, cfg.ema_decay) if cfg.use_ema else None
        # one generator per purpose, so that resuming restores each stream exactly
        self.generators = {
            "index_sampler": torch.Generator().manual_seed(cfg.sampler_seed),  # same on every rank
            "data": torch.Generator().manual_seed(cfg.seed + 1000 * self.rank),
            "noise": torch.Generator().manual_seed(cfg.seed + 1000 * self.rank + 1),
        }
        self.global_step = 0
        self.nonfinite_in_a_row = 0

    def _encode_all_prompts(self, adapter: FlowAdapter) -> None:
        """Every prompt of this rank encoded once, before any training state exists (LoRA, optimizer, EMA,
        sharding), the transformer and the VAE parked in host memory meanwhile (``encode_all``): the
        device holds the text encoders or the model, never both."""
        t0 = time.perf_counter()
        adapter.encode_all(self.prompts, PROMPT_CHUNK)
        if self.is_main and adapter.encoded_prompts:
            print(f"flowbp-train: encoded {adapter.encoded_prompts} prompts (the empty negative prompt "
                  f"included) in {adapter.encode_seconds:.1f} s on {adapter.device}, "
                  f"{str(adapter.dtype).removeprefix('torch.')}{encoded_where(adapter)} "
                  f"({time.perf_counter() - t0:.1f} s with the moves)", file=sys.stderr, flush=True)

    # -------------------------------------------------------------- one step
    def _micro_step(self, loss_scale: float, last: bool = True) -> tuple:
        cfg, ad = self.cfg, self.adapter
        idx = torch.randint(len(self.prompts), (cfg.train_batch_size,), generator=self.generators["data"])
        prompts = [self.prompts[i] for i in idx.tolist()]
        batch = ad.encode_prompts(prompts)
        sigmas = ad.sigmas(cfg.num_steps)
        velocity = ad.velocity_fn(batch, sigmas, grad_negative=cfg.grad_negative)
        x_init = ad.initial_noise(cfg.train_batch_size, generator=self.generators["noise"])
        ro = rollout(velocity, x_init, sigmas, cache=cfg.velocity_cache, latent_dtype=self.latent_dtype)
        plan = self.method.plan(cfg.num_steps, self.generators["index_sampler"])
        if cfg.cfg_grad_compensate and ad.cfg_multiplier > 1 and ad.two_branch_cfg:
            loss_scale = loss_scale / ad.cfg_multiplier
        # gradient accumulation: earlier micro-batches never synchronise; the last one does, once
        outer = self.no_sync() if (self.no_sync is not None and not last) else contextlib.nullcontext()
        with outer:
            out = reward_backprop(self.method, velocity, ro, lambda x: self.reward.score(ad.decode(x), prompts),
                                  plan=plan, executor=cfg.executor, loss=self.loss_spec, params=self.params,
                                  noise_generator=self.generators["noise"],  # this rank's DRaFT-LV noise
                                  loss_scale=loss_scale, no_sync=self.no_sync if last else None,
                                  all_finite=self.all_finite)
        terms = getattr(self.reward, "terms", None)
        if callable(terms):  # a reward made of terms (the miniature's tasks): each logged, on the sample x_N
            with torch.no_grad():
                out.diagnostics["reward_terms"] = {k: float(v.float().mean())
                                                   for k, v in terms(ad.decode(ro.sample), prompts).items()}
        return out, prompts

    def training_step(self) -> dict:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches); returns the log record."""
        cfg = self.cfg
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        outs, skip_reason = [], None
        for q in range(cfg.gradient_accumulation_steps):
            try:
                out, _ = self._micro_step(1.0 / cfg.gradient_accumulation_steps,
                                          last=q == cfg.gradient_accumulation_steps - 1)
            except NonFiniteLossError as exc:
                skip_reason = str(exc)
                break
            outs.append(out)
        grad_norm = clipped = None
        if skip_reason is None:
            if self.strategy == "none":
                D.sync_gradients(self.params, self.world_size)
            grad_norm = _scalar(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                skip_reason = f"non-finite gradient norm {grad_norm}"
        if skip_reason is None:
            clipped = _scalar(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
            self.optimizer.step()
            self.lr_scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            warnings.warn(f"step {self.global_step + 1} skipped: {skip_reason}", RuntimeWarning, stacklevel=2)
            if self.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (last: {skip_reason}); stopping. Try a "
                    f"lower learning_rate, mixed_precision=no, or check the reward and the model weights")
        self.global_step += 1
        rec = step_record(self.global_step, outs, lr=self.lr_scheduler.get_last_lr()[0], grad_norm=grad_norm,
                          clipped=clipped, skipped=skip_reason is not None, seconds=time.perf_counter() - t0,
                          device=self.device)
        if self.world_size > 1 and rec["loss"] is not None:  # log the mean over ranks (skips are global)
            both = torch.tensor([rec["loss"], rec["reward"]], dtype=torch.float64, device=self.dist.device)
            torch.distributed.all_reduce(both)
            rec["loss"], rec["reward"] = (both / self.world_size).tolist()
        return rec

    # -------------------------------------------------------------- checkpoints
    def _write_weights(self, folder: Path, state_dict: dict | None = None, *, weights: str = "raw",
                       with_ema: bool = False) -> None:
        """LoRA (diffusers format) or ``transformer/`` (``flowbp_train.weights``); ``state_dict``: the full
        weights gathered from the ranks (multi-rank export). ``weights`` labels the LoRA file (``raw`` or
        ``ema``); ``with_ema`` also writes the EMA LoRA beside the raw one (checkpoints)."""
        cfg, tr, lora = self.cfg, self.adapter.transformer, self.cfg.rank > 0

        def info(kind: str) -> dict:
            return W.lora_info(cfg, family=self.adapter.family, step=self.global_step, weights=kind)

        W.save_trained(folder, tr, lora=lora, lora_alpha=cfg.effective_lora_alpha, info=info(weights),
                       state_dict=state_dict)
        if lora and with_ema and self.ema is not None:
            with self.ema.swapped_in():
                W.save_trained(folder, tr, lora=True, lora_alpha=cfg.effective_lora_alpha, info=info("ema"),
                               name=W.EMA_LORA_FILE)

    def _state_objects(self) -> dict:
        """What a checkpoint restores besides the weights."""
        return {"optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler, "ema": self.ema,
                "generators": self.generators}

    def save_checkpoint(self) -> Path | None:
        state = {"method": self.cfg.method, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "strategy": self.strategy, "config": json.loads(json.dumps(self.cfg.to_dict(), default=str))}
        limit = self.cfg.checkpoints_total_limit
        if self.world_size > 1:  # every rank writes its shards
            return ckpt.save_checkpoint_distributed(self.out, self.global_step, model=self.model, state=state,
                                                    total_limit=limit, **self._state_objects())
        write = lambda folder: self._write_weights(folder, with_ema=True)
        return ckpt.save_checkpoint(self.out, self.global_step, write, state=state, total_limit=limit,
                                    **self._state_objects())

    def resume(self) -> None:
        """Load the checkpoint verified at construction (if any), then apply the config's changeable
        settings (learning rate, betas, EMA decay...) over the restored ones; changes are logged."""
        if self._resume_from is None:
            return
        folder, verified = self._resume_from
        self._resume_from = None
        err, state = None, None
        try:
            if self.world_size > 1:
                state = ckpt.load_checkpoint_distributed(folder, model=self.model, verified=verified,
                                                         **self._state_objects())
            else:
                read = lambda f: W.load_trained(f, self.adapter.transformer, lora=self.cfg.rank > 0)
                state = ckpt.load_checkpoint(folder, read, map_location=self.device, verified=verified,
                                             **self._state_objects())
        except ckpt.CheckpointError as exc:
            err = str(exc)
        D.raise_if_any(err, ckpt.CheckpointError, self.dist)
        rundir.apply_resumed_settings(self.optimizer, self.lr_scheduler, self.ema, self.cfg)
        self.global_step = state["global_step"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        if self.is_main:
            rundir.record_resume_changes(self.out / self.cfg.logging_dir, folder, self.global_step, self.resume_changes)

    # -------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> TrainResult:
        cfg = self.cfg
        self.resume()
        if self.is_main:  # every input is checked by now: the CPU thread settings flowbp-train chose at start
            from flowbp_train.threads import announce

            announce()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
        self.tracker.start(self.global_step)
        result = TrainResult(self.out, self.global_step)
        from tqdm.auto import tqdm

        from flowbp_train.threads import rebalance

        bar = tqdm(total=cfg.max_train_steps, initial=self.global_step, desc="flowbp",
                   disable=not (cfg.progress_bar and self.is_main))
        try:
            while self.global_step < cfg.max_train_steps:
                rebalance("flowbp-train")  # a CPU run whose thread count flowbp-train chose: follow the load
                rec = self.training_step()
                result.records.append(rec)
                self.tracker.log(rec, self.global_step)
                bar.update(1)
                if rec["loss"] is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", reward=f"{rec['reward']:.4f}")
                if self.global_step % cfg.checkpointing_steps == 0 or self.global_step == cfg.max_train_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self.tracker.close()
        result.global_step = self.global_step
        self.save_final()
        return result

    # -------------------------------------------------------------- final outputs
    def save_final(self) -> None:
        """Final weights (EMA when used), sample images and the model card. Called on every rank: a
        multi-rank run gathers the full weights (and samples with all ranks); rank 0 writes."""
        ctx = self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            full = D.full_state_dict(self.model) if self.world_size > 1 else None
            if self.is_main:
                self._write_weights(self.out, full, weights="ema" if self.ema is not None else "raw")
            images = self.sample_images() if self.cfg.num_sample_images else []
        if self.is_main:
            W.write_model_card(self.out, self.cfg, self.global_step, len(images))

    def sample_images(self) -> list[Path]:
        """Euler samples (``sample_steps``) of the first prompts with a fixed seed, as ``samples/*.png``."""
        from flowbp_train.evaluate import sample_images

        cfg = self.cfg
        prompts = (self.prompts * cfg.num_sample_images)[: cfg.num_sample_images]
        return sample_images(self.adapter, prompts, self.out / "samples", num_steps=cfg.sample_steps, seed=cfg.seed,
                             latent_dtype=self.latent_dtype, write=self.is_main)


def train(cfg: TrainConfig, *, adapter: FlowAdapter | None = None, reward=None) -> TrainResult:
    """Run a whole training (resuming when ``resume_from_checkpoint`` is set). Under torchrun the process
    group is destroyed at the end, also after an error."""
    try:
        return Trainer(cfg, adapter=adapter, reward=reward).train()
    finally:
        D.cleanup()
