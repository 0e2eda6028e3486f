"""The real CLI under both launchers, on the CPU miniature with 2 ranks (gloo): torchrun with FSDP2 and
accelerate launch with DDP. Each run writes a 2-rank checkpoint and the gathered LoRA, from which
``flowbp-mini report`` (the quick start's second step) writes the report."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

RECIPE = str(ROOT / "recipes" / "mini" / "flowbp-lagrange.yaml")
OVERRIDES = ["max_train_steps=2", "checkpointing_steps=2", "progress_bar=false"]


def _launch(prefix, out, strategy):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*prefix, "-m", "flowbp_train.cli", RECIPE, *OVERRIDES, f"output_dir={out}",
           f"distributed_strategy={strategy}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _check(out: Path, stdout: str):
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["global_step"] == 2
    assert sorted(p.name for p in (out / "checkpoint-2").glob("random_states_*")) == [
        "random_states_0.safetensors", "random_states_1.safetensors"]
    assert sorted(p.name for p in (out / "checkpoint-2" / "shards").iterdir()) == [
        "layout.json", "replicated.safetensors", "shard_0.safetensors", "shard_1.safetensors"]
    manifest = json.loads((out / "checkpoint-2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "shards/shard_1.safetensors" in manifest["files"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    from flowbp_train.mini.cli import main as mini_main

    assert mini_main(["report", str(out)]) == 0
    assert (out / "grid_before_after.png").is_file() and (out / "summary.json").is_file()
    log = (out / "logs" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2  # rank 0 logs; the other rank does not
    assert stdout.count("steps done") == 1


def test_torchrun_fsdp2_cli(tmp_path):
    out = tmp_path / "torchrun"
    stdout = _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                     out, "fsdp2")
    _check(out, stdout)


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="accelerate is not installed")
def test_accelerate_launch_ddp_cli(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "accelerate")
    exe = exe if os.path.exists(exe) else shutil.which("accelerate")
    out = tmp_path / "accelerate"
    stdout = _launch([exe, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                      "--mixed_precision", "no", "--dynamo_backend", "no"], out, "ddp")
    _check(out, stdout)
