"""The Trainer under torchrun with 2 CPU ranks (gloo), DDP and FSDP2, LoRA and EMA: resuming a
2-rank checkpoint with 2 ranks gives the uninterrupted losses; the LoRA exported from the ranks loads
into a plain diffusers pipeline and reproduces the trained transformer; FSDP2 shards every block of the
SD3.5-Large and Qwen-Image transformers and trains their LoRA; a pickle planted in any file of
the 2-rank checkpoint never runs and stops the resume on both ranks with one line naming the file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import subprocess_env

pytest.importorskip("diffusers")
pytest.importorskip("peft")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORKER = Path(__file__).with_name("_train_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-train")
    env = subprocess_env(OMP_NUM_THREADS="1", FLOWBP_BACKEND="torch", FLOWBP_JIT="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((out / "rank0.json").read_text())


def test_runs_with_two_ranks(results):
    assert results["world_size"] == 2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_resume_two_ranks(results, strategy):
    rec = results[f"resume_{strategy}"]
    assert len(rec["uninterrupted"]) == 4 and all(v is not None for v in rec["uninterrupted"])
    # bit-exact: the same operations in the same order in the same process settings (2 ranks, one
    # thread each); the checkpoint restores weights, optimizer and RNG streams by copy
    assert rec["resumed"] == rec["uninterrupted"][2:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_export_from_two_ranks_loads_in_diffusers(results, strategy):
    rec = results[f"export_{strategy}"]
    assert rec["lora_effect"] > 1e-5  # the LoRA changed the model, so the comparison is not vacuous
    assert rec["max_diff"] <= 1e-6


def test_fsdp2_bf16_base_with_fp32_lora(results):
    rec = results["bf16_fsdp2"]
    assert rec["lora_dtypes"] == ["torch.float32"] and rec["base_dtypes"] == ["torch.bfloat16"]
    assert len(rec["losses"]) == 2 and all(v is not None and abs(v) < 1e3 for v in rec["losses"])


@pytest.mark.parametrize("family, blocks", [("sd3-large", ["JointTransformerBlock"]),
                                            ("qwen-image", ["QwenImageTransformerBlock"]),
                                            ("z-image", ["ZImageTransformerBlock"]),  # layers and both refiners
                                            ("flux2-dev", ["Flux2SingleTransformerBlock", "Flux2TransformerBlock"])])
def test_fsdp2_shards_the_block_classes_of_the_further_families(results, family, blocks):
    rec = results["fsdp2_families"][family]
    # fully_shard swaps each sharded module's class for a subclass named FSDP<class>
    assert rec["root_sharded"] and rec["sharded"] == [f"FSDP{b}" for b in blocks]
    assert rec["sharded_count"] == rec["blocks"] > 0
    assert len(rec["losses"]) == 2 and all(v is not None and abs(v) < 1e3 for v in rec["losses"])
    assert rec["lora_moved"]


def test_planted_pickles_never_run_with_two_ranks(results):
    rows = results["pickles"]
    assert len(rows) >= 17 and {r["file"] for r in rows} >= {"shards/shard_0.safetensors", "shards/shard_1.safetensors",
                                                             "shards/layout.json", "random_states_1.safetensors",
                                                             "scheduler.pt", "manifest.json"}
    for r in rows:
        assert not r["ran"], r
        assert r["message"] is not None and "\n" not in r["message"] and r["file"] in r["message"], r
    print(f"\nplanted pickles (2 ranks): {len(rows)} files tried, {sum(r['ran'] for r in rows)} executed")
