"""The training loop: cached rollout -> method plan -> executor -> clip -> AdamW -> EMA -> log/checkpoint.

Before anything heavy loads, :func:`preflight` finds every file the run needs (prompts, the model
folder and its components, the reward's weights); the reward is built before the model. One step
(shared/design/ALGORITHM.md sections 2-5): sample prompts and noise, roll the model out without
gradient caching every latent and velocity, draw the method's plan from the index sampler (its own
CPU generator, seeded identically on every rank; DRaFT-LV's re-noising noise comes from each rank's
own noise generator), let ``flowbp_kernels.reward_backprop`` accumulate the
parameter gradients, then clip (default 1.0), step AdamW and the EMA. A non-finite loss or gradient
skips the step; ``max_nonfinite_steps`` in a row stop the run. A reward with ``terms(images, prompts)``
has each term's batch mean on the sample logged as ``reward_<term>``. Under torchrun the transformer is
wrapped by DDP or sharded by FSDP2 (``distributed_strategy``, see ``flowbp_train.distributed``); the
executor's node backwards run under ``no_sync`` but the last, so gradients are reduced once per step.
Before any model loads, a run locks its ``output_dir`` and checks the checkpoint it resumes (manifest,
config changes: ``flowbp_train.rundir``, ``flowbp_train.checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flowbp_kernels import NonFiniteLossError, get_method, reward_backprop, rollout
from flowbp_train import checkpoint as ckpt
from flowbp_train import distributed as D
from flowbp_train import rundir
from flowbp_train.config import ConfigError, TrainConfig, check_lora_targets, dump_yaml, load_prompts, validate
from flowbp_train.lora_files import EMA_LORA_FILE, LORA_FILE
from flowbp_train.models.base import FlowAdapter

#: prompts encoded per text-encoder call at the start of a run (bounds the encoders' activation memory)
PROMPT_CHUNK = 8


# ------------------------------------------------------------------------------------------- helpers
def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device: {spec!r} requested but CUDA is not available")
    return dev


def dist_state(cfg: TrainConfig) -> D.DistState:
    """Join the process group when started by torchrun / accelerate launch (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return D.init_distributed("cpu" if cfg.device == "cpu" else "auto")
    return D.DistState(device=resolve_device(cfg.device))


def shard_prompts(prompts: list[str], rank: int, world_size: int) -> list[str]:
    """This rank's share of the prompts (every world_size-th, starting at rank); never empty."""
    shard = prompts[rank::world_size]
    return shard or prompts


def sync_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """Average gradients across ranks by hand (``distributed_strategy: none`` under torchrun only; DDP
    and FSDP2 reduce during the executor's last node backward)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.AVG)


def preflight(cfg: TrainConfig, *, model: bool = True, reward: bool = True) -> None:
    """Find every file the run needs before anything heavy is loaded: the prompts file, the model folder
    (or cached model id) with each component's config and weights, the reward's weight files and optional
    packages. Raises :class:`ConfigError` with one line naming the key (``reward_kwargs.checkpoint_path``)."""
    if isinstance(cfg.prompts, str) and cfg.prompts != "demo" and not Path(cfg.prompts).is_file():
        raise ConfigError(f"prompts: file not found: {cfg.prompts}")
    if model:
        from flowbp_train.models import adapter_class

        check = getattr(adapter_class(cfg.family), "check_files", None)
        try:
            folder = check(cfg.pretrained_model_name_or_path, revision=cfg.revision) if callable(check) else None
        except (OSError, ValueError) as exc:  # the messages start with the key
            raise ConfigError(_one_line(exc)) from None
        if folder is not None and cfg.rank and cfg.lora_target_modules:  # names against the real module tree
            from flowbp_train.models.files import meta_transformer

            check_lora_targets(meta_transformer(folder), cfg.lora_target_modules)
    if reward:
        from flowbp_train.rewards import check_reward_files

        try:
            check_reward_files(cfg.reward, key_prefix="reward_kwargs.", **cfg.reward_kwargs)
        except (OSError, ImportError, ValueError, TypeError) as exc:
            msg = _one_line(exc).removeprefix("name: ")
            raise ConfigError(msg if msg.startswith("reward") else f"reward: {msg}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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


class Tracker:
    """Per-step log: a JSONL file always, tensorboard (default) and/or wandb (``report_to``)."""

    def __init__(self, cfg: TrainConfig, out: Path, enabled: bool):
        self.enabled = enabled
        self.tb = self.wandb = self.jsonl = None
        if not enabled:
            return
        log_dir = out / cfg.logging_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = log_dir / "train_log.jsonl"
        if cfg.report_to in ("tensorboard", "all"):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(log_dir))
        if cfg.report_to in ("wandb", "all"):
            try:
                import wandb
            except ImportError:
                raise ImportError("report_to: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.tracker_project_name, config=cfg.to_dict(), dir=str(out))

    def start(self, step: int) -> None:
        """Open the JSONL log at ``step`` (the resumed step, 0 for a fresh run): records of later steps,
        from a run that went on past its last checkpoint, are dropped, so each step is logged once."""
        if not self.enabled or self.jsonl is not None:
            return
        rundir.cut_log(self.jsonl_path, step)
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        if self.jsonl is None:
            self.start(step - 1)
        self.jsonl.write(json.dumps(record, default=float) + "\n")
        self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and v is not None and math.isfinite(v)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _scalar(t) -> float:
    """A norm as a float (FSDP2 returns a DTensor)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _mean(t) -> float | None:
    return None if t is None else float(t.float().mean())


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process RSS high-water (KiB -> GiB)


@dataclass
class TrainResult:
    """What :func:`train` returns: the per-step records (also in ``logs/train_log.jsonl``)."""

    output_dir: Path
    global_step: int
    records: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float | None]:
        return [r["loss"] for r in self.records]


def _release_lock(lock: rundir.OutputDirLock, held: dict) -> None:
    if held["held"]:
        held["held"] = False
        lock.release()


# ------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the adapter, reward, optimizer and state of one run. ``adapter`` / ``reward`` may be given
    (tests, notebooks); otherwise they are built from the config."""

    def __init__(self, cfg: TrainConfig, *, adapter: FlowAdapter | None = None, reward=None):
        self.cfg = validate(cfg)
        self.dist = dist_state(cfg)
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        self.out = Path(cfg.output_dir)
        self.lock = rundir.OutputDirLock(self.out)
        self._lock_held = {"held": False}
        weakref.finalize(self, _release_lock, self.lock, self._lock_held)  # a Trainer dropped without close()
        self.resume_changes: dict[str, tuple] = {}
        try:
            self._claim_output_dir()
            self._resume_from = self._check_resume()  # before any model loads
            self._setup(cfg, adapter, reward)
        except BaseException:
            self.close()
            raise

    def _claim_output_dir(self) -> None:
        """Lock ``output_dir`` (rank 0; every rank fails if it is busy) and remove what a killed run left."""
        self._lock_held["held"] = rundir.claim_output_dir(self.lock, self.dist)

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
        _release_lock(self.lock, self._lock_held)

    def _setup(self, cfg: TrainConfig, adapter: FlowAdapter | None, reward) -> None:
        self.device = self.dist.device if adapter is None else adapter.device
        self.method = get_method(cfg.method, **cfg.method_options)
        self.prompts = shard_prompts(load_prompts(cfg.prompts), self.rank, self.world_size)
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
        if cfg.offload_text_encoders:  # encode every prompt of this rank once, then free the encoders
            for i in range(0, len(self.prompts), PROMPT_CHUNK):
                adapter.encode_prompts(self.prompts[i : i + PROMPT_CHUNK])
            adapter.offload_text_encoders()
            if self.is_main and adapter.encoded_prompts:
                where = "" if adapter.device.type == "cpu" else "; text encoders offloaded to the CPU"
                print(f"flowbp-train: encoded {adapter.encoded_prompts} prompts (the empty negative prompt "
                      f"included) in {adapter.encode_seconds:.1f} s on {adapter.device}, "
                      f"{str(adapter.dtype).removeprefix('torch.')}{where}", file=sys.stderr, flush=True)

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
        if cfg.cfg_grad_compensate and ad.guidance_scale > 1 and ad.family != "flux1":
            loss_scale = loss_scale / ad.guidance_scale
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
                sync_gradients(self.params, self.world_size)
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
        rec = self._record(outs, grad_norm, clipped, skip_reason, time.perf_counter() - t0)
        if self.world_size > 1 and rec["loss"] is not None:  # log the mean over ranks (skips are global)
            both = torch.tensor([rec["loss"], rec["reward"]], dtype=torch.float64, device=self.dist.device)
            torch.distributed.all_reduce(both)
            rec["loss"], rec["reward"] = (both / self.world_size).tolist()
        return rec

    def _record(self, outs, grad_norm, clipped, skip_reason, seconds) -> dict:
        rec = {"step": self.global_step, "skipped": skip_reason is not None, "lr": self.lr_scheduler.get_last_lr()[0],
               "grad_norm": grad_norm, "grad_norm_clipped": clipped, "step_time": seconds,
               "peak_memory_gb": _peak_memory_gb(self.device)}
        if outs:
            d = outs[-1].diagnostics
            rec.update(
                loss=sum(float(o.loss) for o in outs),
                reward=float(torch.cat([o.reward for o in outs]).float().mean()),
                weight=float(torch.cat([o.weight for o in outs]).float().mean()),
                weights=[float(w) for o in outs for w in o.weight],
                rewards=[float(r) for o in outs for r in o.reward],
                d_j=_mean(d.get("d_j")), d_0=_mean(d.get("d_0")),
                k=d.get("k"), j=d.get("j"), tau=d.get("tau"), active=list(d.get("active") or ()),
                node_grad_norms=[n.get("grad_norm") for n in d.get("nodes", [])],
            )
            for k in d.get("reward_terms") or {}:  # this rank's mean over its micro-batches
                rec[f"reward_{k}"] = sum(o.diagnostics["reward_terms"][k] for o in outs) / len(outs)
        else:
            rec.update(loss=None, reward=None)
        return rec

    # -------------------------------------------------------------- checkpoints
    def _write_weights(self, folder: Path, state_dict: dict | None = None, *, weights: str = "raw",
                       with_ema: bool = False) -> None:
        """LoRA (diffusers format) or ``transformer/``; ``state_dict``: the full weights gathered from
        the ranks (multi-rank export), else the module's own. ``weights`` labels the LoRA file (``raw``
        or ``ema``); ``with_ema`` also writes the EMA LoRA beside the raw one (checkpoints)."""
        tr = self.adapter.transformer
        if self.cfg.rank == 0:
            if state_dict is None:
                tr.save_pretrained(folder / "transformer")
            else:  # gathered from shards: the config plus one safetensors file, as save_pretrained writes
                from safetensors.torch import save_file

                (folder / "transformer").mkdir(parents=True, exist_ok=True)
                tr.save_config(folder / "transformer")
                save_file({k: v.contiguous() for k, v in state_dict.items()},
                          folder / "transformer" / "diffusion_pytorch_model.safetensors")
        else:
            from peft.utils import get_peft_model_state_dict

            self._save_lora(folder, LORA_FILE, get_peft_model_state_dict(tr, state_dict=state_dict), weights)
            if with_ema and self.ema is not None:
                with self.ema.swapped_in():
                    self._save_lora(folder, EMA_LORA_FILE, get_peft_model_state_dict(tr), "ema")

    def _save_lora(self, folder: Path, name: str, state: dict, weights: str) -> None:
        cfg = self.cfg
        info = {"weights": weights, "step": self.global_step, "method": cfg.method,
                "base_model": str(cfg.pretrained_model_name_or_path)}
        if weights == "ema":
            info["ema_decay"] = cfg.ema_decay
        self.adapter.save_lora_weights(folder, state, weight_name=name, lora_alpha=cfg.effective_lora_alpha,
                                       info=info)

    def _read_weights(self, folder: Path) -> None:
        """The trainable weights of a verified checkpoint (safetensors only; errors name the file)."""
        tr = self.adapter.transformer
        if self.cfg.rank == 0:
            ckpt.read_json(folder / "transformer" / "config.json", "model config")
            files = sorted((folder / "transformer").glob("*.safetensors"))
            if not files:
                raise ckpt.CheckpointError(f"{folder / 'transformer'} holds no *.safetensors weights")
            state = {}
            for f in files:
                state.update(ckpt.load_safetensors(f))
            try:
                tr.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ckpt.CheckpointError(f"{files[0]} does not fit this transformer "
                                           f"({' '.join(str(exc).split())[:200]})") from None
            return
        from peft.utils import set_peft_model_state_dict

        path = folder / ckpt.LORA_FILE
        state = {k.removeprefix("transformer."): v for k, v in ckpt.load_safetensors(path).items()}
        try:
            res = set_peft_model_state_dict(tr, state, adapter_name="default")
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path} does not fit this LoRA ({' '.join(str(exc).split())[:200]})") from None
        if getattr(res, "unexpected_keys", None):
            raise ckpt.CheckpointError(f"{path}: unexpected LoRA keys {res.unexpected_keys[:3]}")
        for p in self.params:  # peft copies in the file's dtype into our fp32 LoRA weights
            p.data = p.data.float()

    def save_checkpoint(self) -> Path | None:
        state = {"method": self.cfg.method, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "strategy": self.strategy, "config": json.loads(json.dumps(self.cfg.to_dict(), default=str))}
        if self.world_size > 1:  # every rank writes its shards
            return ckpt.save_checkpoint_distributed(
                self.out, self.global_step, model=self.model, optimizer=self.optimizer,
                lr_scheduler=self.lr_scheduler, ema=self.ema, generators=self.generators, state=state,
                total_limit=self.cfg.checkpoints_total_limit)
        return ckpt.save_checkpoint(
            self.out, self.global_step, lambda folder: self._write_weights(folder, with_ema=True),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler, ema=self.ema, generators=self.generators,
            state=state, total_limit=self.cfg.checkpoints_total_limit,
        )

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
                state = ckpt.load_checkpoint_distributed(folder, model=self.model, optimizer=self.optimizer,
                                                         lr_scheduler=self.lr_scheduler, ema=self.ema,
                                                         generators=self.generators, verified=verified)
            else:
                state = ckpt.load_checkpoint(folder, self._read_weights, optimizer=self.optimizer,
                                             lr_scheduler=self.lr_scheduler, ema=self.ema,
                                             generators=self.generators, map_location=self.device,
                                             verified=verified)
        except ckpt.CheckpointError as exc:
            err = str(exc)
        D.raise_if_any(err, ckpt.CheckpointError, self.dist)
        rundir.apply_resumed_settings(self.optimizer, self.lr_scheduler, self.ema, self.cfg)
        self.global_step = state["global_step"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        changed = {k: v for k, v in self.resume_changes.items() if k not in ("resume_from_checkpoint",)}
        if changed and self.is_main:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            warnings.warn(f"resumed {folder} at step {self.global_step} with changed settings: {lines}",
                          stacklevel=2)
            log_dir = self.out / self.cfg.logging_dir
            log_dir.mkdir(parents=True, exist_ok=True)
            with open(log_dir / "resume_log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.global_step, "checkpoint": str(folder),
                                    "changed": {k: list(v) for k, v in changed.items()}}, default=str) + "\n")

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

        bar = tqdm(total=cfg.max_train_steps, initial=self.global_step, desc="flowbp",
                   disable=not (cfg.progress_bar and self.is_main))
        try:
            while self.global_step < cfg.max_train_steps:
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
            self._model_card(len(images))
            self.adapter.final_report(self.out, self.cfg)

    @torch.no_grad()
    def sample_images(self) -> list[Path]:
        """Euler samples (``sample_steps``) of the first prompts with a fixed seed, as PNG files."""
        from PIL import Image

        cfg, ad = self.cfg, self.adapter
        prompts = (self.prompts * cfg.num_sample_images)[: cfg.num_sample_images]
        folder = self.out / "samples"
        if self.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        sigmas = ad.sigmas(cfg.sample_steps)
        gen = torch.Generator().manual_seed(cfg.seed)
        paths = []
        for i, prompt in enumerate(prompts):
            batch = ad.encode_prompts([prompt])
            ro = rollout(ad.velocity_fn(batch, sigmas), ad.initial_noise(1, generator=gen), sigmas,
                         latent_dtype=self.latent_dtype)
            img = ad.decode(ro.sample)[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
            path = folder / f"sample_{i:02d}.png"
            if self.is_main:  # every rank samples (FSDP2 forwards are collective); rank 0 writes
                Image.fromarray(img).save(path)
            paths.append(path)
        if self.is_main:
            (folder / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return paths

    def _model_card(self, n_images: int) -> None:
        cfg = self.cfg
        kind = f"LoRA (rank {cfg.rank}, alpha {cfg.effective_lora_alpha:g})" if cfg.rank else \
            "full fine-tuning of the transformer"
        load = (f"pipe.load_lora_weights(\"{self.out}\")" if cfg.rank else
                f"transformer = <TransformerClass>.from_pretrained(\"{self.out}/transformer\")")
        text = f"""---
base_model: {cfg.pretrained_model_name_or_path}
library_name: diffusers
tags: [flowbp, reward-backpropagation, {cfg.family}, {cfg.method}]
---
# {cfg.method} on {cfg.family}

Aligned with direct reward backpropagation (flowbp-kernels, FlowBP arXiv 2606.11075) from
`{cfg.pretrained_model_name_or_path}`: method `{cfg.method}` ({cfg.executor} executor), reward
`{cfg.reward}` (loss `{cfg.loss}`), {cfg.num_steps} rollout steps at {cfg.resolution}x{cfg.resolution},
{kind}, {self.global_step} steps, learning rate {cfg.learning_rate:g}{', EMA ' + str(cfg.ema_decay) if cfg.use_ema
                                                                    else ''}.

Load: `{load}`. The resolved configuration is `config.yaml`; the per-step log is
`{cfg.logging_dir}/train_log.jsonl`; {n_images} sample images are in `samples/`.
"""
        (self.out / "README.md").write_text(text)


def train(cfg: TrainConfig, *, adapter: FlowAdapter | None = None, reward=None) -> TrainResult:
    """Run a whole training (resuming when ``resume_from_checkpoint`` is set). Under torchrun the process
    group is destroyed at the end, also after an error."""
    try:
        return Trainer(cfg, adapter=adapter, reward=reward).train()
    finally:
        D.cleanup()
