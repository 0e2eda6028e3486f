"""Peak memory and time of one real training step at published size (the GPU kit's stage 5).

The trainer's own pieces, with random weights and no download: the family's transformer, VAE and pipeline
built from the published architectures shipped in flowbp_train/memory/architectures/ (the ones the
memory planner simulates), the family adapter (flowbp_train.models), an HPSv2-sized reward tower
(OpenCLIP ViT-H-14 in flowbp_train.rewards.HPSv2Reward), the recipe recipes/<family>/flowbp-lagrange.yaml
(LoRA r32, bf16, gradient checkpointing) at batch 1, and ``Trainer.training_step``: cached rollout, plan,
reward_backprop through the VAE decode and the reward tower, clip, AdamW, EMA. Per (family, resolution,
executor) one warm-up step, then measured steps; the peak allocated and reserved bytes of each phase
(rollout, backprop, optimizer) and of the whole step, one JSON line each (``--jsonl``), with the keys the
memory simulation of the same step writes (family, resolution, batch, executor, method, phase,
peak_allocated_bytes, peak_reserved_bytes). Phases are found by wrapping the trainer's two engine calls
(the trainer has no hook). ``--dry-run``: tiny widths on the CPU (peaks not measured there).

    python benchmarks/train_step.py --jsonl OUT.jsonl                 # a GPU: FLUX.1-dev 1024, 512 (+ SD3.5-M)
    python benchmarks/train_step.py --dry-run --jsonl OUT.jsonl       # CPU, tiny widths, the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "python")]

import torch  # noqa: E402

FAMILIES = ("flux1", "sd3")
#: The HPSv2 tower is open_clip's own ViT-H-14 config (create_model, no weights); tiny runs shrink it.
REWARD_ARCH = "ViT-H-14"
TINY_OPENCLIP = {"embed_dim": 32,
                 "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
#: Tiny runs: the VAE of the tiny config downsamples 8x like the real one; 64 px gives FLUX 16 tokens.
TINY_RESOLUTION = 64
TINY_STEPS = 6  # the smallest rollout with a Lagrange window (the method needs >= 3 steps in it)


def _cfg(spec: dict, tiny: bool) -> dict:
    cfg = json.loads(json.dumps(spec["config"]))
    if tiny:
        for k, v in spec["tiny"].items():
            if isinstance(v, dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
    return cfg


@contextlib.contextmanager
def _default(dtype: torch.dtype, device: torch.device):
    """Build modules directly in ``dtype`` on ``device``: no fp32 copy of 12B parameters on the way."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(old)


def build_pipeline(family: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    """The family's diffusers pipeline with random transformer and VAE weights and no text encoders."""
    import diffusers

    from flowbp_train.memory.build import load_architecture

    arch = load_architecture(family)
    t_spec, v_spec, pipe_name = arch["transformer"], arch["vae"], arch["pipeline"]
    with _default(dtype, device):
        transformer = getattr(diffusers, t_spec["class"])(**_cfg(t_spec, tiny))
        vae = getattr(diffusers, v_spec["class"])(**_cfg(v_spec, tiny))
    sched_kw = {"shift": 3.0} if family == "sd3" else {
        "use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
        "max_shift": 1.15}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**sched_kw)
    pipe_cls = getattr(diffusers, pipe_name)
    if family == "flux1":
        pipe = pipe_cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    else:
        pipe = pipe_cls(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    text_len = 8 if tiny else arch["text_len"]
    return pipe, text_len, sum(p.numel() for p in transformer.parameters())


def prompt_encoder(transformer, text_len: int, pooled: bool):
    """Stands in for the text encoders: each prompt -> seeded random embeddings of the published shapes."""
    cfg = transformer.config

    def encode(prompts: list[str]) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(len(prompts))
        out = {"encoder_hidden_states": torch.randn(len(prompts), text_len, cfg.joint_attention_dim, generator=g)}
        if pooled:
            out["pooled_projections"] = torch.randn(len(prompts), cfg.pooled_projection_dim, generator=g)
        return out

    return encode


def build_reward(tiny: bool, device: torch.device, dtype: torch.dtype):
    """HPSv2Reward around an OpenCLIP ViT-H-14 with random weights (the architecture, not the checkpoint)."""
    import open_clip

    from flowbp_train.rewards.hpsv2 import HPSv2Reward

    with _default(torch.float32, device):
        model = open_clip.CLIP(**TINY_OPENCLIP) if tiny else open_clip.create_model(REWARD_ARCH, pretrained=None)
    tokenizer = open_clip.get_tokenizer(REWARD_ARCH)
    return HPSv2Reward(model=model, tokenizer=tokenizer, device=device, dtype=dtype), \
        sum(p.numel() for p in model.parameters())


class PhaseMeter:
    """Peaks of the phases of ``Trainer.training_step``, by wrapping the trainer module's ``rollout`` and
    ``reward_backprop``: rollout (from the step's start to the rollout's end, prompts and noise included),
    backprop (reward_backprop: surrogate, VAE decode, reward, backward), optimizer (the rest: clip, AdamW,
    EMA). Each window starts with ``reset_peak_memory_stats``, so the step's peak is the largest of them."""

    PHASES = ("rollout", "backprop", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.peaks: dict[str, tuple[int, int]] = {}
        self.seconds: dict[str, float] = {}
        self._t = 0.0

    def _mark(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.peaks[phase] = (torch.cuda.max_memory_allocated(self.device),
                                 torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        now = time.perf_counter()
        self.seconds[phase] = now - self._t
        self._t = now

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peaks, self.seconds, self._t = {}, {}, time.perf_counter()

    def finish(self) -> None:
        self._mark("optimizer")

    @contextlib.contextmanager
    def wrapping(self, trainer_module):
        rollout, backprop = trainer_module.rollout, trainer_module.reward_backprop

        def rollout_(*a, **k):
            out = rollout(*a, **k)
            self._mark("rollout")
            return out

        def backprop_(*a, **k):
            out = backprop(*a, **k)
            self._mark("backprop")
            return out

        trainer_module.rollout, trainer_module.reward_backprop = rollout_, backprop_
        try:
            yield self
        finally:
            trainer_module.rollout, trainer_module.reward_backprop = rollout, backprop


def run_family(family: str, resolutions: list[int], executors: list[str], args, device, emit, deadline) -> None:
    import flowbp_train.trainer as trainer_mod
    from flowbp_train.config import load_config
    from flowbp_train.models.flux import FluxAdapter
    from flowbp_train.models.sd3 import SD3Adapter

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = args.dry_run
    reward, reward_params = build_reward(tiny, device, dtype)
    for res in resolutions:
        if time.perf_counter() > deadline:
            emit({"family": family, "resolution": res, "skipped": "time budget spent"})
            continue
        t_build = time.perf_counter()
        pipe, text_len, t_params = build_pipeline(family, tiny, device, dtype)
        adapter_cls = FluxAdapter if family == "flux1" else SD3Adapter
        adapter = adapter_cls(pipe, resolution=res, device=device, dtype=dtype,
                              prompt_encoder=prompt_encoder(pipe.transformer, text_len, pooled=True))
        out_dir = tempfile.mkdtemp(prefix="flowbp-train-step-")
        overrides = {"pretrained_model_name_or_path": f"random weights (published {family} architecture)",
                     "resolution": res, "train_batch_size": args.batch, "output_dir": out_dir, "report_to": "none",
                     "num_sample_images": 0, "progress_bar": False, "device": str(device),
                     "prompts": ["a red fox sitting in fresh snow, golden hour"]}
        if tiny:
            overrides.update(num_steps=TINY_STEPS, mixed_precision="no")
        cfg = load_config(REPO / "recipes" / family / "flowbp-lagrange.yaml", overrides)
        trainer = trainer_mod.Trainer(cfg, adapter=adapter, reward=reward)
        build_s = time.perf_counter() - t_build
        for ex in executors:
            base = {"family": family, "resolution": res, "batch": args.batch, "executor": ex, "method": cfg.method,
                    "num_steps": cfg.num_steps, "lora_rank": cfg.rank, "dtype": str(dtype).replace("torch.", ""),
                    "gradient_checkpointing": cfg.gradient_checkpointing, "size": "tiny" if tiny else "published",
                    "transformer_params": t_params, "reward_params": reward_params, "build_s": build_s}
            if time.perf_counter() > deadline:
                emit({**base, "skipped": "time budget spent"})
                continue
            trainer.cfg.executor = ex  # the one knob that differs between rows (read per micro-step)
            meter = PhaseMeter(device)
            try:
                step_s = []
                for rep in range(1 + args.repeats):  # the first step warms up (allocator, kernels, autotuning)
                    with meter.wrapping(trainer_mod):
                        meter.start()
                        rec = trainer.training_step()
                        meter.finish()
                    if rep:
                        step_s.append(rec["step_time"])
            except torch.cuda.OutOfMemoryError as exc:
                emit({**base, "phase": "step", "oom": True, "error": str(exc).splitlines()[0]})
                torch.cuda.empty_cache()
                continue
            except Exception as exc:  # noqa: BLE001 - a failing row (non-finite rollout...) must not stop the others
                import traceback

                emit({**base, "phase": "step", "error": f"{type(exc).__name__}: {exc}"[:500],
                      "traceback": traceback.format_exc()[-3000:]})
                continue
            common = {**base, "step_s": sorted(step_s)[len(step_s) // 2], "step_s_all": step_s,
                      "loss": rec["loss"], "skipped_step": rec["skipped"]}
            if meter.cuda:
                for phase in PhaseMeter.PHASES:
                    alloc, reserved = meter.peaks[phase]
                    emit({**common, "phase": phase, "phase_s": meter.seconds[phase], "peak_allocated_bytes": alloc,
                          "peak_reserved_bytes": reserved, "measured": "torch.cuda.max_memory_allocated/reserved"})
                emit({**common, "phase": "step", "peak_allocated_bytes": max(p[0] for p in meter.peaks.values()),
                      "peak_reserved_bytes": max(p[1] for p in meter.peaks.values()),
                      "measured": "torch.cuda.max_memory_allocated/reserved"})
            else:
                emit({**common, "phase": "step", "peak_allocated_bytes": None, "peak_reserved_bytes": None,
                      "phase_s": meter.seconds, "process_rss_highwater_bytes":
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "measured": "not on CPU (no allocator counter); the dry run proves the code path"})
        del trainer, adapter, pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny widths on the CPU")
    ap.add_argument("--families", nargs="+", default=["flux1", "sd3"], choices=FAMILIES,
                    help="in order; a family starts only while the time budget lasts")
    ap.add_argument("--resolutions", nargs="+", type=int, default=[1024, 512])
    ap.add_argument("--executors", nargs="+", default=["streaming", "retain"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="measured steps after the warm-up step")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new row after this many seconds")
    ap.add_argument("--jsonl", default=None)
    args = ap.parse_args(argv)
    from _common import append_jsonl, metadata

    t0 = time.perf_counter()
    deadline = t0 + (args.budget_s if args.budget_s is not None else float("inf"))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    resolutions = [TINY_RESOLUTION] if args.dry_run else args.resolutions
    meta = {"stage": "train_step", **metadata()}
    failures = 0

    def emit(row: dict) -> None:
        nonlocal failures
        failures += 1 if "error" in row else 0
        row = {**row, **meta, "t_s": round(time.perf_counter() - t0, 1)}
        append_jsonl(args.jsonl, row)
        gib = lambda b: f"{b / 2**30:8.2f}" if isinstance(b, int) else f"{'-':>8}"  # noqa: E731
        print(f"{row.get('family', '-'):6} {row.get('resolution', '-'):>5} {row.get('executor', '-'):9} "
              f"{row.get('phase', '-'):9} alloc GiB {gib(row.get('peak_allocated_bytes'))} reserved GiB "
              f"{gib(row.get('peak_reserved_bytes'))} step s {row.get('step_s', float('nan')):7.2f} "
              f"{row.get('skipped', '') or row.get('error', '')}", flush=True)

    print(f"# train_step on {meta['device']} (torch {meta['torch']}, git {meta['git']})")
    for family in args.families:
        if time.perf_counter() > deadline:
            emit({"family": family, "skipped": "time budget spent"})
            continue
        try:
            run_family(family, resolutions, args.executors, args, device, emit, deadline)
        except Exception as exc:  # noqa: BLE001 - one family's failure must not lose the other's rows
            import traceback

            emit({"family": family, "error": f"{type(exc).__name__}: {exc}"[:500],
                  "traceback": traceback.format_exc()[-3000:]})
    print(f"# train_step: {failures} failed rows ({time.perf_counter() - t0:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
