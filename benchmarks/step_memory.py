"""Peak memory and time of one training step per family, method and executor, at 512 and 1024.

Builds each family's transformer from its published architecture (benchmarks/configs/*.json; random
weights, no download), adds LoRA (rank 32, the adapters' default targets, as the trainer does), and runs
one trainer step without VAE and reward model: cached rollout -> plan -> reward_backprop -> AdamW, with
a synthetic reward on the latents (so the numbers are the transformer's share; add the VAE decode and
the reward model for a full step). ``--size tiny`` shrinks every width/depth for a CPU smoke run;
``--size full`` is meant for a GPU. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU
there is no per-step allocator counter, so the column is the process RSS high-water mark (monotone).
Prints a table and writes JSON (with device, versions and git revision in every row).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import time
from pathlib import Path

import torch

import flowbp_kernels as fb

HERE = Path(__file__).resolve().parent
FAMILIES = {"flux1": "flux1-dev", "sd3": "sd3.5-medium", "flux2": "flux2-klein-base-9b"}


def git_rev() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def build(family: str, size: str, device, dtype):
    import diffusers
    from peft import LoraConfig

    from flowbp_train.models import adapter_class

    spec = json.loads((HERE / "configs" / f"{FAMILIES[family]}.json").read_text())
    cfg = dict(spec["config"])
    if size == "tiny":
        cfg.update(spec["tiny"])
    model = getattr(diffusers, spec["class"])(**cfg).to(device, dtype)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                 target_modules=adapter_class(family).lora_targets(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    torch.nn.init.normal_(params[1], std=1e-3)  # non-zero lora_B somewhere, so every path carries gradient
    model.enable_gradient_checkpointing()
    text_len = 8 if size == "tiny" else spec["text_len"]
    return model, params, cfg, text_len


def velocity_of(family: str, model, cfg: dict, res: int, batch: int, text_len: int, device, dtype):
    """velocity_fn and initial noise for the family's layout (FLUX: packed tokens; SD3: latent images)."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=g).to(device, dtype)
    if family == "sd3":
        side = res // 8
        x0 = torch.randn(batch, cfg["in_channels"], side, side, generator=g)
        pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
        sig = fb.flow_sigmas(25, shift=3.0)

        def v(x, i):
            t = torch.full((batch,), float(sig[i]) * 1000, device=device, dtype=dtype)
            return model(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=emb,
                         pooled_projections=pooled, return_dict=False)[0]
        return v, x0, sig
    side = res // 16
    seq = side * side
    x0 = torch.randn(batch, seq, cfg["in_channels"], generator=g)
    if family == "flux1":
        pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device, dtype)
        ii = torch.zeros(side, side, 3)
        ii[..., 1] += torch.arange(side)[:, None]
        ii[..., 2] += torch.arange(side)[None, :]
        img_ids, txt_ids = ii.reshape(-1, 3).to(device, dtype), torch.zeros(text_len, 3, device=device, dtype=dtype)
        sig = fb.flow_sigmas(25, mu=fb.flux_mu(seq))
        guid = torch.full((batch,), 4.0, device=device)

        def v(x, i):
            t = torch.full((batch,), float(sig[i]), device=device, dtype=dtype)
            return model(hidden_states=x.to(dtype), timestep=t, guidance=guid, pooled_projections=pooled,
                         encoder_hidden_states=emb, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return v, x0, sig
    hw = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    img_ids = hw.unsqueeze(0).expand(batch, -1, -1).to(device)
    tl = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    txt_ids = tl.unsqueeze(0).expand(batch, -1, -1).to(device)
    sig = fb.flow_sigmas(25, mu=fb.flux2_mu(seq, 25))

    def v(x, i):  # conditional branch only: the negative CFG branch runs without gradient (one more no-grad pass)
        t = torch.full((batch,), float(sig[i]), device=device, dtype=dtype)
        return model(hidden_states=x.to(dtype), timestep=t, guidance=None, encoder_hidden_states=emb,
                     txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    return v, x0, sig


def run_row(family, method, executor, res, args, device, dtype, built) -> dict:
    model, params, cfg, text_len = built
    v, x0, sig = velocity_of(family, model, cfg, res, args.batch, text_len, device, dtype)
    sig = fb.flow_sigmas(args.num_steps, **({"shift": 3.0} if family == "sd3" else {"mu": float(
        fb.flux_mu(x0.shape[1]) if family == "flux1" else fb.flux2_mu(x0.shape[1], args.num_steps))}))
    m = fb.get_method(method)
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator().manual_seed(114)
    times = []
    for rep in range(args.repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ro = fb.rollout(v, x0.to(device), sig, latent_dtype=dtype)
        fb.reward_backprop(m, v, ro, lambda x: -x.float().square().mean(dim=tuple(range(1, x.dim()))),
                           generator=gen, executor=executor, params=params)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:  # the first step warms up
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"family": family, "method": method, "executor": executor, "resolution": res, "batch": args.batch,
            "num_steps": args.num_steps, "size": args.size, "step_s": statistics.median(times),
            "peak_gib": peak, "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss_highwater",
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "git": git_rev()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "full"], default="tiny")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--methods", nargs="+", default=["flowbp-lagrange", "flowbp-sparse", "leapalign", "draft-lv"])
    ap.add_argument("--executors", nargs="+", default=["streaming", "retain"])
    ap.add_argument("--resolutions", nargs="+", type=int, default=[512, 1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "step_memory.json"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    print(f"{'family':7} {'method':16} {'executor':9} {'res':>5} {'step s':>8} {'peak GiB':>9}"
          f"  ({args.size}, {device})")
    for fam in args.families:
        built = build(fam, args.size, device, dtype)
        for res in args.resolutions:
            for method in args.methods:
                for ex in args.executors:
                    try:
                        row = run_row(fam, method, ex, res, args, device, dtype, built)
                    except torch.cuda.OutOfMemoryError:
                        row = {"family": fam, "method": method, "executor": ex, "resolution": res, "oom": True}
                        torch.cuda.empty_cache()
                        print(f"{fam:7} {method:16} {ex:9} {res:5}      OOM")
                        rows.append(row)
                        continue
                    rows.append(row)
                    print(f"{fam:7} {method:16} {ex:9} {res:5} {row['step_s']:8.3f} {row['peak_gib']:9.2f}")
        del built
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
