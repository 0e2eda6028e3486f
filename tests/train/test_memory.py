"""The memory planner: its accounting against real-tensor runs of the same program (one rank, and two gloo
ranks under DDP and FSDP2), the setup's prompt encoding with the text encoders on the device, the no-grad
forward replay, the caching-allocator model, the fit answer and its candidate changes, and the CLI.

Every simulation of the module runs once, in a module fixture that spreads them over two processes forked
from this one (nothing to import again; a fake run costs per op, so most take a few seconds on the tiny
models), and the tests assert on the results; the real two-rank runs are forked too. The CLI runs once as
a subprocess (the user's path: a model folder, FSDP2 on two ranks, the fit answer), its errors in-process."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flowbp_train.config import from_dict, load_config
from flowbp_train.memory import build, plan_memory, planner
from flowbp_train.memory import tracker as tracker_module
from flowbp_train.memory.allocator import (
    LARGE_BUFFER,
    CachingAllocator,
    GiB,
    MiB,
    OutOfMemory,
    allocation_size,
    replay,
    round_size,
)
from flowbp_train.memory.simulate import simulate
from flowbp_train.memory.tracker import MemoryTracker

from helpers import ROOT
from helpers.pipelines import PIPELINES, POOLED_DIM, TEXT_DIM, PixelReward, tiny_adapter

#: the families with a stand-in of their pipeline's encode_prompt, then those planned from the prompt shapes
#: their architecture file declares (``prompt_outputs``)
FAMILIES = ("flux1", "sd3", "flux2", "sd3-large", "qwen-image", "z-image", "flux2-dev")
# The real CPU run allocates a handful of 512-byte blocks that the fake run does not (small index/scalar
# tensors the CPU kernels make that fake kernels fold away): a fixed number of blocks, whatever the model
# size (at full size < 1e-6 of the peak). Measured: at most 6 per phase here.
BLOCK_SLACK = 8 * 512
#: T5's vocabulary in the tiny folders: its embedding (4 MiB in fp32) outweighs the tiny step, as T5-XXL
#: (9 GiB in bf16) does at full size, so the setup's prompt encoding sets the peak (FLUX.1 at 512 px)
T5_VOCAB = 32128


def _text_encoders(family: str) -> dict[str, torch.nn.Module]:
    """Tiny real text encoders of the family's kinds (the published widths are what the planner ships)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2, vocab_size=T5_VOCAB))
    clip = dict(intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=1000,
                max_position_embeddings=77)
    if family == "flux1":
        return {"text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=POOLED_DIM, **clip)), "text_encoder_2": t5}
    if family == "sd3":  # two CLIPs with projections (16 + 16 = the pooled width), T5 of the text width
        make = lambda: CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=16, **clip))  # noqa: E731
        return {"text_encoder": make(), "text_encoder_2": make(), "text_encoder_3": t5}
    return {}  # flux2: the tiny transformer's text width is no multiple of three Qwen3 layers; embeddings given


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each tiny family saved as a diffusers model folder (FLUX.1 and SD3 with real tiny text encoders):
    the planner reads only its config.json files."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for fam, make in PIPELINES.items():
        pipe = make(0)
        pipe.register_modules(**_text_encoders(fam))
        pipe.save_pretrained(root / fam)
        out[fam] = root / fam
    return out


def tiny_cfg(folder, family, **kw):
    # two active nodes of four steps (a fake run costs per op: the fewest steps that keep every phase)
    values = dict(family=family, pretrained_model_name_or_path=str(folder), method="flowbp-sparse", num_steps=4,
                  method_options={"num_active": 2}, resolution=16, train_batch_size=2, mixed_precision="no", rank=4,
                  max_sequence_length=4, use_ema=True, report_to="none", prompts=["a cat", "a dog"], reward="hpsv2",
                  sample_steps=2)
    values.update(kw)
    return from_dict(values)


def tiny_reward(cfg):
    return build.build_reward(cfg, config_override=build.tiny_clip_config())


def pixel_reward(cfg):
    return PixelReward()


# ------------------------------------------------------------------------------------------ the simulations
def wide_cfg(**kw):
    """SD3.5-Medium's published widths with one transformer block and no text encoders (``wide_spec``):
    allocations of tens of MiB, so the allocator's segments do not swamp the fit answer, at the cost of a
    tiny model (a fake run costs per op, not per byte)."""
    values = dict(family="sd3", pretrained_model_name_or_path=planner.PUBLISHED, method="flowbp-sparse",
                  method_options={"num_active": 4}, num_steps=6, resolution=512, train_batch_size=2,
                  executor="retain", gradient_checkpointing=False, rank=4, guidance_scale=1.0, report_to="none",
                  prompts=["a cat", "a dog"], sample_steps=2, reward="hpsv2", reward_kwargs={"dtype": "bf16"})
    values.update(kw)
    return planner.prepare_config(from_dict(values))


def wide_spec():
    spec = build.component_specs("sd3", None)
    spec["transformer"]["config"].update(num_layers=1, dual_attention_layers=[])
    spec["text_encoders"] = {}
    return spec


def _wide_kw():
    return dict(reward_factory=pixel_reward, sample=False, spec=wide_spec())


def _counted_plan(cfg, gib, base):
    """``plan_memory`` and the number of runs it simulated; a run of ``base``'s config is not simulated
    again but copied from ``base`` (the same program gives the same trace: one simulation serves the
    plan, the fit answers and the bound tests)."""
    calls = []
    orig = planner._Measured.__init__

    def counted(self, c, *a, **kw):
        calls.append(c)
        if c == base.sim_cfg:
            self.__dict__.update(copy.deepcopy(base.__dict__))
        else:
            orig(self, c, *a, **kw)

    planner._Measured.__init__ = counted
    try:
        return plan_memory(cfg, gpu_memory=gib, **_wide_kw()), len(calls)
    finally:
        planner._Measured.__init__ = orig


def _dist_cfg(folder, strategy):
    return tiny_cfg(folder, "sd3", distributed_strategy=strategy, prompts=["a cat", "a dog", "a bus", "a tree"])


def _summary(sim) -> dict:
    t = sim.trace
    return {"phase_peaks": t.phase_peaks, "peak": [t.peak.bytes, t.peak.phase], "breakdown": t.breakdown(),
            "weights": sim.weights, "strategy": sim.strategy,
            "categories": sorted({t.kinds[aid] for kind, aid, _ in t.events if kind == 0})}


def _job(job):
    """One simulation of the module (run in a forked worker; the result comes back pickled)."""
    name, folders, arg = job
    if name == "run":  # (family, fake)
        fam, fake = arg
        return simulate(tiny_cfg(folders[fam], fam), fake=fake, reward_factory=tiny_reward)
    if name == "kept":  # text encoders not offloaded
        return simulate(tiny_cfg(folders[arg], arg, offload_text_encoders=False), reward_factory=pixel_reward,
                        sample=False)
    if name == "nodes":  # (executor, active nodes)
        ex, k = arg
        cfg = tiny_cfg(folders["sd3"], "sd3", executor=ex, guidance_scale=1.0, method_options={"num_active": k},
                       use_ema=False)
        return simulate(cfg, reward_factory=pixel_reward, sample=False).trace.phase_peaks
    if name == "slicing":
        cfg = tiny_cfg(folders["sd3"], "sd3", train_batch_size=4, vae_slicing=arg, guidance_scale=1.0)
        return simulate(cfg, reward_factory=pixel_reward, sample=False).trace.phase_peaks["decode backward"]
    if name == "wide":  # the plan; the fit answer just below its live peak; and on a GPU that holds the
        # fixed costs and not even the weights (1.2 GB here)
        base = planner._Measured(wide_cfg(), 1, _wide_kw(), None)
        base.sim_cfg = wide_cfg()
        p = base.plan
        tight = _counted_plan(wide_cfg(), (p.peak_bytes + sum(p.fixed.values()) - 1) / GiB, base)
        return base, tight, _counted_plan(wide_cfg(), 1.5, base)
    if name == "dist":  # the fake rank 0 of two, no-grad forwards replayed (the default) around the hooks
        return _summary(simulate(_dist_cfg(folders["sd3"], arg), reward_factory=pixel_reward, world_size=2))
    if name == "patches":  # in a worker that has simulated: nothing the planning patched is left patched
        from flowbp_train.memory import simulate as sim_module

        m = tiny_adapter("sd3").transformer.to(torch.float64)
        return {"Module.to": torch.nn.Module.to is sim_module._ORIG_TO,
                "clip_grad_norm_": torch.nn.utils.clip_grad_norm_.__name__ == "clip_grad_norm_",
                "resize_": torch.UntypedStorage.resize_ is tracker_module._ORIG_RESIZE,
                "no process group": not torch.distributed.is_initialized(),
                "a real module converts": next(m.parameters()).dtype == torch.float64}
    raise ValueError(name)


def _forked_child() -> None:
    """First thing in a forked child: one torch thread. The parent may have started OpenMP's thread pool
    (a suite at OMP_NUM_THREADS=2), whose threads a fork does not copy: a parallel region in the child would
    wait on them forever (torch's own DataLoader workers do the same)."""
    torch.set_num_threads(1)


def _rank_run(rank: int, port: int, folder: str, out: str) -> None:
    """One of two real gloo ranks (forked): both strategies' runs with real tensors, rank 0 writes them."""
    code = 1
    try:
        _forked_child()
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        res = {s: _summary(simulate(_dist_cfg(folder, s), fake=False, reward_factory=pixel_reward, world_size=2))
               for s in ("ddp", "fsdp2")}
        if rank == 0:
            Path(out).write_text(json.dumps(res))
        torch.distributed.destroy_process_group()
        code = 0
    finally:
        os._exit(code)


@pytest.fixture(scope="module")
def gloo_ranks(folders, tmp_path_factory):
    """Two real gloo ranks, forked before the simulations start (so they run beside them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("ranks") / "rank0.json"
    ctx = multiprocessing.get_context("fork")  # the ranks inherit every import: no start-up cost
    procs = [ctx.Process(target=_rank_run, args=(r, port, str(folders["sd3"]), str(out))) for r in (0, 1)]
    for p in procs:
        p.start()
    return procs, out


@pytest.fixture(scope="module")
def cli_run(folders):
    """``flowbp-train ... --plan-memory --world-size 2 --gpu-memory 1000`` on a model folder, started
    before the simulations so that it runs beside them."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["recipes/sd3/draft-k.yaml", f"pretrained_model_name_or_path={folders['sd3']}", "resolution=16",
            "num_steps=2", "train_batch_size=2", "max_sequence_length=4", "sample_steps=1", "guidance_scale=1",
            "reward=mini", "prompts=[one, two, three, four]", "distributed_strategy=fsdp2",
            "--plan-memory", "--world-size", "2", "--gpu-memory", "1000"]
    proc = subprocess.Popen([sys.executable, "-m", "flowbp_train.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def sims(folders, gloo_ranks, cli_run):
    """Every simulation of the module, two at a time in forked workers, the longest first (the real gloo
    ranks and the CLI's subprocess, started first, run beside them)."""
    jobs = [("wide", None), *(("run", (f, True)) for f in FAMILIES), ("dist", "fsdp2"), ("dist", "ddp"),
            *(("nodes", (ex, k)) for ex in ("streaming", "retain") for k in (2, 4)),
            ("kept", "sd3"), ("slicing", False), ("slicing", True), *(("run", (f, False)) for f in FAMILIES),
            ("patches", None)]
    with multiprocessing.get_context("fork").Pool(2, initializer=_forked_child) as pool:
        results = pool.map(_job, [(n, folders, a) for n, a in jobs], chunksize=1)
    return dict(zip(jobs, results))


@pytest.fixture(scope="module")
def runs(sims):
    """A fake run (as the planner runs it: no-grad forwards replayed) and a real-tensor run of the same
    config, per family."""
    return {f: (sims["run", (f, True)], sims["run", (f, False)]) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_fake_run_matches_the_real_tensor_run(runs, family):
    fake, real = runs[family]
    f, r = fake.trace, real.trace
    # no-grad forwards of one signature are replayed, except Z-Image's (its transformer returns a list of
    # tensors, which the memo does not record: each forward is simulated, the same bytes, more time)
    assert (fake.forward_replays > 0) == (family != "z-image") and real.forward_replays == 0
    assert abs(f.peak.bytes - r.peak.bytes) <= BLOCK_SLACK, (f.peak, r.peak)
    assert f.peak.phase == r.peak.phase
    # every phase of the run (setup and encode, rollout, each node, decode, reward, optimizer, EMA, sample)
    assert f.phase_peaks.keys() == r.phase_peaks.keys()
    for phase, b in r.phase_peaks.items():
        assert abs(f.phase_peaks[phase] - b) <= BLOCK_SLACK, phase
    fs, rs = fake.stage_peaks(), real.stage_peaks()
    assert fs.keys() == rs.keys() == {"setup", "training step", "sample step"}
    assert all(abs(fs[s][0] - rs[s][0]) <= BLOCK_SLACK for s in fs)
    assert fake.weights == real.weights  # parameter storages: identical to the byte
    fb, rb = f.breakdown(), r.breakdown()
    for cat in ("frozen weights", "text encoders", "trainable weights", "optimizer state", "EMA", "rollout cache"):
        assert fb[cat] == rb[cat], cat
    step = f.breakdown(fs["training step"][1])
    assert step["optimizer state"] == 2 * step["trainable weights"]  # AdamW: two fp32 moments per weight
    assert step["EMA"] == step["trainable weights"] > 0


@pytest.mark.parametrize("family", ["flux1", "sd3"])
def test_setup_encodes_with_the_text_encoders_on_the_device(runs, sims, family):
    fake, real = runs[family]
    stages = fake.stage_peaks()
    enc_bytes = sum(round_size(t.numel() * t.element_size()) for m in _text_encoders(family).values()
                    for t in (*m.parameters(), *m.buffers()))
    # on the device (fp32 here, the model dtype) only while the setup encodes, then offloaded
    at_encode = fake.trace.breakdown(stages["setup"][1])
    assert at_encode["text encoders"] == enc_bytes
    # the transformer and the VAE wait in host memory meanwhile: of the frozen weights only the reward's
    # are on the device (the transformer was placed when built, and comes back once the encoders leave)
    assert at_encode["frozen weights"] == fake.weights["reward (frozen)"] > 0
    assert fake.trace.phase_peaks["load weights"] >= fake.weights["transformer (frozen)"] > 0
    assert fake.trace.breakdown(stages["training step"][1])["text encoders"] == 0
    # T5's embedding outweighs the tiny step: the encode phase sets the run's peak, as for FLUX.1 at 512 px
    assert fake.trace.peak.phase == real.trace.peak.phase == "encode"
    assert fake.cached_prompts == (3 if family == "sd3" else 2)  # SD3's CFG: the empty prompt encoded too
    if family == "sd3":  # offload_text_encoders: false keeps them on the device from the first encode on
        kept = sims["kept", "sd3"]
        assert kept.trace.breakdown(kept.stage_peaks()["training step"][1])["text encoders"] == enc_bytes


def test_streaming_peak_is_flat_in_the_active_nodes_and_retain_is_not(sims):
    peaks = {(ex, k): sims["nodes", (ex, k)] for ex in ("streaming", "retain") for k in (2, 4)}
    node = lambda pp: max(v for p, v in pp.items() if p.startswith("node"))  # noqa: E731
    # streaming: one model graph whatever K; only the segment's K latent-sized cotangents (and their
    # casts) are held together: at most 4 latents (batch 2 x 4 x 8 x 8 fp32 = 2 KiB) per extra node
    latent = 2 * 4 * 8 * 8 * 4
    slack = 4 * latent * (4 - 2)
    assert abs(node(peaks["streaming", 4]) - node(peaks["streaming", 2])) <= slack
    assert node(peaks["retain", 4]) - node(peaks["retain", 2]) > 2 * slack  # a model graph per node


# ------------------------------------------------------------------------------------------ the fit answer
def test_fit_answer_is_the_limited_allocator_replay(sims):
    wide = sims["wide", None][0]
    p = wide.plan
    fixed = sum(p.fixed.values())
    assert p.allocated_bytes < p.reserved_bytes  # the replay keeps cached segments
    assert wide.fit(p.total_bytes)[0] is True  # room for every segment the unlimited replay reserved
    ok, why = wide.fit(p.peak_bytes + fixed - 1)
    assert not ok and "live tensors alone" in why
    # in between, the answer is the replay limited to the GPU less the fixed costs (cache released, retried)
    for frac in (0.25, 0.5, 0.75, 0.95):
        limit = int(p.allocated_bytes + frac * (p.reserved_bytes - p.allocated_bytes)) + fixed
        assert wide.fit(limit)[0] is (replay(wide.sim.trace.events, limit=limit - fixed).oom_at is None)


def test_gpu_memory_names_the_cheapest_change_that_fits(sims):
    _, (tight, n_tight), (none, n_none) = sims["wide", None]
    assert tight.fits is False  # retain's own live peak does not fit
    first = tight.suggestions[0]
    assert first.overrides == {"executor": "streaming"} and first.status == "fits" and first.total_bytes > 0
    assert all(s.status == "not tried" for s in tight.suggestions[1:])  # stopped at the cheapest that fits
    assert n_tight == 2  # the plan and the one change: nothing else simulated
    table = tight.table()
    assert "does NOT fit" in table and "executor=streaming" in table and "a cheaper change fits" in table
    # below what the weights alone hold, no change of the step can help: skipped, not simulated
    assert none.fits is False and n_none == 1
    assert none.suggestions and all(s.status == "skipped" for s in none.suggestions)
    assert all(" peak (" in s.reason and "needs" in s.reason for s in none.suggestions)
    assert "no change the trainer offers fits" in none.table() and "skipped, not simulated" in none.table()


def test_candidates_are_real_trainer_options():
    cfg = wide_cfg(offload_text_encoders=False, mixed_precision="no", velocity_cache="fp32",
                   reward_kwargs={}, train_batch_size=4)
    cands = planner.candidates(cfg, world_size=2)
    keys = {k for s in cands for k in s.overrides}
    assert keys == {"executor", "gradient_checkpointing", "vae_slicing", "offload_text_encoders",
                    "distributed_strategy", "train_batch_size", "gradient_accumulation_steps", "velocity_cache",
                    "reward_kwargs.dtype", "mixed_precision"}
    for s in cands:  # each one validates as a config a run would take
        planner._apply(cfg, s.overrides)
    assert [s.cost for s in cands] == sorted((s.cost for s in cands), key=["exact", "slower", "lossy"].index)


# ------------------------------------------------------------------------------------------ many ranks
def test_ranks_match_real_gloo_ranks(gloo_ranks, sims):
    """Rank 0 of a fake two-rank group against rank 0 of two real gloo ranks (DDP's buckets, FSDP2's
    shards, gathered blocks and reduce-scatter buffers, the same tracker): equal to a few blocks."""
    procs, out = gloo_ranks
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    real = json.loads(out.read_text())
    for strategy in ("ddp", "fsdp2"):
        f, r = sims["dist", strategy], real[strategy]
        assert f["strategy"] == r["strategy"] == strategy
        assert f["weights"] == r["weights"]  # this rank's shards (FSDP2) or the replica (DDP), to the byte
        assert f["phase_peaks"].keys() == r["phase_peaks"].keys()
        for phase, b in r["phase_peaks"].items():
            assert abs(f["phase_peaks"][phase] - b) <= BLOCK_SLACK, (strategy, phase)
        for cat, b in r["breakdown"].items():
            assert abs(f["breakdown"][cat] - b) <= BLOCK_SLACK, (strategy, cat)
        assert f["categories"] == r["categories"]
    assert {"gathered weights", "reduce buffers"} <= set(real["fsdp2"]["categories"])
    assert "reduce buffers" in real["ddp"]["categories"] and "gathered weights" not in real["ddp"]["categories"]
    # FSDP2 holds half of each weight (padded to whole rows), DDP a full replica
    assert sims["dist", "fsdp2"]["weights"]["transformer (frozen)"] < sims["dist", "ddp"]["weights"][
        "transformer (frozen)"]


# ------------------------------------------------------------------------------------------ building blocks
def test_tracker_counts_storages_once_at_allocator_granularity():
    with MemoryTracker() as tr:
        a = torch.empty(1000)  # 4000 B -> 4096
        view = a[:10]  # noqa: F841 - a view shares the storage
        b = torch.empty(1)  # 4 B -> 512
        assert tr.allocated == 4096 + 512
        del a
        assert tr.allocated == 4096 + 512  # the view keeps the storage
        del view
        b.untyped_storage().resize_(0)  # FSDP2 frees its gathered weights so: seen
        assert tr.allocated == 0
        b.untyped_storage().resize_(2048)
        assert tr.allocated == 2048
        del b
    assert tr.allocated == 0 and tr.trace.peak.bytes == 4608
    assert torch.UntypedStorage.resize_ is tracker_module._ORIG_RESIZE  # the hook is gone with the mode


def test_caching_allocator_rules():
    assert round_size(1) == 512 and round_size(513) == 1024
    assert allocation_size(1 * MiB) == 2 * MiB  # small pool segment
    assert allocation_size(5 * MiB) == LARGE_BUFFER  # 1-10 MiB share a 20 MiB segment
    assert allocation_size(11 * MiB) == 12 * MiB  # larger: rounded up to 2 MiB
    al = CachingAllocator()
    x = al.malloc(5 * MiB)
    y = al.malloc(5 * MiB)  # split off the same 20 MiB segment (remainder > 1 MiB)
    assert al.reserved == 20 * MiB and al.allocated == 10 * MiB
    al.free(x)
    al.free(y)  # merges back into one free 20 MiB block
    z = al.malloc(15 * MiB)  # best fit reuses it: no new segment
    assert al.reserved == 20 * MiB and z.size == 15 * MiB  # the other 5 MiB split off
    w = al.malloc(11 * MiB)
    assert al.reserved == 32 * MiB  # 20 + 12
    al.free(w)
    small = [al.malloc(1000) for _ in range(3)]
    assert al.reserved == 34 * MiB and all(s.size == 1024 for s in small)
    lim = CachingAllocator(limit=21 * MiB)
    lim.free(lim.malloc(11 * MiB))  # a free 12 MiB segment stays cached...
    lim.malloc(13 * MiB)  # ...and is released to make room for a 14 MiB one
    assert lim.reserved == 14 * MiB
    with pytest.raises(OutOfMemory):
        lim.malloc(15 * MiB)
    # a trace's release event (torch.cuda.empty_cache) returns the free segments, not the used ones: a
    # freed 12 MiB segment beside a 20 MiB one in use (5 MiB of it); then a 17 MiB request, which neither
    # the cached segment nor the 15 MiB left of the other can hold
    events = [(0, 1, 11 * MiB), (0, 2, 5 * MiB), (1, 1, 11 * MiB)]
    assert replay(events).reserved_at_end == 32 * MiB
    assert replay([*events, (2, -1, 0)]).reserved_at_end == 20 * MiB
    assert replay([*events, (0, 3, 17 * MiB)]).peak_reserved == 50 * MiB  # 20 + the cached 12 + 18
    assert replay([*events, (2, -1, 0), (0, 3, 17 * MiB)]).peak_reserved == 38 * MiB  # 20 + 18


def test_vae_slicing_keeps_the_step_and_lowers_the_decode_peak(tmp_path, sims):
    from flowbp_train.trainer import Trainer

    recs = {}
    for sl in (False, True):
        cfg = from_dict(dict(family="flux1", pretrained_model_name_or_path="tiny", num_steps=6, resolution=16,
                             train_batch_size=3, mixed_precision="no", device="cpu", rank=4, loss="neg",
                             output_dir=str(tmp_path / str(sl)), report_to="none", num_sample_images=0,
                             progress_bar=False, prompts=["a", "b", "c"], vae_slicing=sl))
        tr = Trainer(cfg, adapter=tiny_adapter("flux1"), reward=PixelReward())
        recs[sl] = tr.training_step()
    # same images: the loss agrees to fp32 summation-order noise of one decode (conv over a smaller batch)
    assert recs[True]["loss"] == pytest.approx(recs[False]["loss"], rel=1e-5)
    assert recs[True]["grad_norm"] == pytest.approx(recs[False]["grad_norm"], rel=1e-4)
    assert sims["slicing", True] < sims["slicing", False]  # the decode backward's peak


def test_planning_patches_do_not_outlive_the_plan(sims):
    assert all(sims["patches", None].values()), sims["patches", None]


# ------------------------------------------------------------------------------------------ the CLI
@pytest.mark.parametrize("args, key", [
    (["--plan-memory", "--gpu-memory", "-1"], "--gpu-memory"),
    (["--plan-memory", "--gpu-memory", "abc"], "--gpu-memory"),
    (["--gpu-memory", "80"], "--gpu-memory"),
    (["--world-size", "2"], "--world-size"),
    (["--plan-memory", "--world-size", "0"], "--world-size"),
    (["--plan-memory", "--world-size", "two"], "--world-size"),
    (["family=nope", "--plan-memory"], "family"),
    (["reward=nope", "--plan-memory"], "reward"),
    (["reward_kwargs.dtype=fp7", "--plan-memory"], "reward_kwargs.dtype"),
    (["resolution=17", "--plan-memory"], "resolution"),
])
def test_cli_bad_inputs_get_one_line_errors(args, key, capsys):
    from flowbp_train.cli import train_main

    assert train_main(["recipes/flux1/flowbp-lagrange.yaml", *args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flowbp-train: error: {key}"), err
    assert out == ""


def test_cli_plans_a_model_folder_per_rank(cli_run, folders):
    """The user's command, as a subprocess: rank 0 of two FSDP2 ranks from a model folder, fit answered."""
    out, err = cli_run.communicate(timeout=300)
    assert cli_run.returncode == 0, err[-3000:]
    assert "memory plan (simulated, rank 0 of 2, fsdp2)" in out and "1000 GiB GPU: fits" in out
    assert f"architecture: {folders['sd3']}" in out and "stages (live peak)   setup" in out
    assert "NCCL buffers" in out


def test_every_recipe_family_resolves_for_planning():
    for fam in ("flux1", "sd3", "flux2"):
        cfg = load_config(ROOT / "recipes" / fam / "flowbp-lagrange.yaml", check=False)
        spec = build.component_specs(fam, cfg.pretrained_model_name_or_path)
        assert spec["transformer"]["class"].endswith("Transformer2DModel") and spec["text_encoders"]


def test_gpu_memory_takes_a_unit():
    from flowbp_train.memory.cli import parse_gpu_memory

    assert parse_gpu_memory("80") == parse_gpu_memory("80GiB") == parse_gpu_memory("80 GB") == 80.0
    assert parse_gpu_memory("40.5g") == 40.5
    for bad in ("80TB", "GiB", "inf", "0GiB"):
        with pytest.raises(ValueError, match="^--gpu-memory: expected a number of GiB > 0"):
            parse_gpu_memory(bad)


def test_cli_checks_the_model_folder_before_planning(tmp_path, capsys):
    from flowbp_train.cli import train_main

    assert train_main(["recipes/flux1/leapalign.yaml", f"pretrained_model_name_or_path={tmp_path}",
                       "--plan-memory", "--gpu-memory", "80GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flowbp-train: error: pretrained_model_name_or_path"), err
    assert "model_index.json" in err[0]
    # a local path that is no folder: an error, not the shipped architecture planned in its place
    assert train_main(["recipes/flux1/leapalign.yaml", "--plan-memory", "--gpu-memory", "80",
                       f"pretrained_model_name_or_path={tmp_path / 'missing'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a model folder" in err[0], err


def test_a_new_architecture_file_is_picked_up(tmp_path, monkeypatch):
    """A family added with its architecture file and its adapter class (no code here): found by the file's
    ``family``, built through its pipeline class, prompts from the shapes the file declares."""
    import types

    from flowbp_train import models
    from flowbp_train.models.flux import FluxAdapter

    arch = json.loads((build.ARCHITECTURES / "flux1-dev.json").read_text())
    arch["family"] = "newfam"
    arch["transformer"]["config"].update(arch["transformer"].pop("tiny"))
    arch["vae"]["config"].update(arch["vae"].pop("tiny"))
    arch["text_encoders"] = {}
    (tmp_path / "newfam.json").write_text(json.dumps(arch))
    (tmp_path / "rewards.json").write_text("{}")
    assert build.shipped_architectures(tmp_path) == {"newfam": "newfam.json"}
    assert set(build.FAMILY_FILES) >= {"flux1", "sd3", "flux2"}  # the shipped ones, found the same way
    with pytest.raises(ValueError, match="^family: .* declares no prompt_outputs"):
        build.check_spec("newfam", arch)
    arch["prompt_outputs"] = [["batch", "max_sequence_length", TEXT_DIM], ["batch", POOLED_DIM], None]
    (tmp_path / "copy.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="both describe family 'newfam'"):
        build.shipped_architectures(tmp_path)
    monkeypatch.setitem(models.ADAPTERS, "newfam", FluxAdapter)
    cfg = types.SimpleNamespace(family="newfam", pretrained_model_name_or_path=None, mixed_precision="no",
                                resolution=32, guidance_scale=3.5, max_sequence_length=4)
    adapter, _ = build.build_adapter(cfg, spec=arch)
    batch = adapter.encode_prompts(["a cat", "a dog"])
    assert isinstance(adapter, FluxAdapter) and type(adapter.pipeline).__name__ == arch["pipeline"]
    shapes = {k: tuple(v.shape) for k, v in batch.tensors.items()}
    assert shapes == {"encoder_hidden_states": (2, 4, TEXT_DIM), "pooled_projections": (2, POOLED_DIM)}
