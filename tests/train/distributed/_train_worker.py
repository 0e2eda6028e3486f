"""Worker for tests/train/distributed/test_trainer_distributed.py: the Trainer itself under torchrun (2 CPU ranks).

For DDP and FSDP2 with LoRA and EMA: 4 uninterrupted steps vs 2 steps, a checkpoint written by both
ranks, and 2 resumed steps (losses must be identical); and the final LoRA gathered from the ranks,
loaded by a plain diffusers pipeline with ``load_lora_weights``, must reproduce the trained model.
Then a pickle planted in each file of the FSDP2 checkpoint in turn (with the manifest as written, and
rewritten to vouch for the file): every resume must stop on both ranks with one line naming the file,
and the pickle must never run. Two FSDP2 LoRA steps of SD3.5-Large and Qwen-Image record their sharded
block classes.
"""

import json
import os
import shutil
import sys

import torch
import torch.distributed as dist

from flowbp_train.config import from_dict
from flowbp_train.trainer import Trainer

from helpers.pipelines import PixelReward, sd3_pipeline, tiny_adapter  # tests/ on PYTHONPATH (subprocess_env)


def config(out, strategy, **kw):
    values = dict(family="sd3", pretrained_model_name_or_path="tiny", method="flowbp-bridge",
                  method_options={"num_active": 3}, num_steps=6, resolution=16, train_batch_size=1,
                  max_train_steps=4, learning_rate=1e-3, loss="neg", mixed_precision="no", device="cpu", rank=4,
                  output_dir=out, report_to="none", num_sample_images=0, progress_bar=False,
                  checkpointing_steps=2, distributed_strategy=strategy,
                  prompts=["a cat", "a dog", "a red bus", "a tree"])
    values.update(kw)
    return from_dict(values)


def run(out, strategy, **kw):
    t = Trainer(config(out, strategy, **kw), adapter=tiny_adapter("sd3"), reward=PixelReward())
    res = t.train()
    return t, res.losses


def main(root):
    os.environ.setdefault("FLOWBP_BACKEND", "torch")
    r = int(os.environ["RANK"])
    res = {}
    for strategy in ("ddp", "fsdp2"):
        t, full = run(os.path.join(root, f"{strategy}-a"), strategy, use_ema=True)
        res["world_size"] = t.world_size
        run(os.path.join(root, f"{strategy}-b"), strategy, use_ema=True, max_train_steps=2)
        _, resumed = run(os.path.join(root, f"{strategy}-b"), strategy, use_ema=True,
                         resume_from_checkpoint="latest")
        res[f"resume_{strategy}"] = {"uninterrupted": full, "resumed": resumed}
        # export without EMA, so the exported weights are the trained ones
        out = os.path.join(root, f"{strategy}-c")
        t, _ = run(out, strategy, max_train_steps=2)
        g = torch.Generator().manual_seed(3)
        x = torch.randn(1, 4, 8, 8, generator=g)
        enc = torch.randn(1, 4, 32, generator=g)
        pooled = torch.randn(1, 32, generator=g)
        ts = torch.tensor([500.0])
        with torch.no_grad():
            y = t.adapter.transformer(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                                      timestep=ts).sample
        if r == 0:
            pipe = sd3_pipeline(0)
            with torch.no_grad():
                y0 = pipe.transformer(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                                      timestep=ts).sample
            pipe.load_lora_weights(out)
            with torch.no_grad():
                y2 = pipe.transformer(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                                      timestep=ts).sample
            res[f"export_{strategy}"] = {"max_diff": float((y - y2).abs().max()),
                                         "lora_effect": float((y - y0).abs().max())}
        dist.barrier()
    # bf16 base weights with fp32 LoRA under FSDP2: the mixed-precision policy path of wrap_model
    t = Trainer(config(os.path.join(root, "bf16"), "fsdp2", mixed_precision="bf16", max_train_steps=2,
                       checkpointing_steps=100), adapter=tiny_adapter("sd3", dtype=torch.bfloat16),
                reward=PixelReward())
    losses = t.train().losses
    res["bf16_fsdp2"] = {"losses": losses, "lora_dtypes": sorted({str(p.dtype) for p in t.params}),
                         "base_dtypes": sorted({str(p.dtype) for p in t.adapter.transformer.parameters()
                                                if not p.requires_grad})}
    res["fsdp2_families"] = fsdp2_families(root)
    res["pickles"] = plant_pickles(root, r)
    with open(os.path.join(root, f"rank{r}.json"), "w") as f:
        json.dump(res, f, indent=1)
    dist.destroy_process_group()


def fsdp2_families(root):
    """Two FSDP2 LoRA steps of each further family: which block classes were sharded, the losses, and
    whether the (gathered) LoRA weights moved."""
    from torch.distributed.fsdp import FSDPModule

    from flowbp_train.distributed import BLOCK_LISTS

    out = {}
    for family in ("sd3-large", "qwen-image", "z-image", "flux2-dev"):
        cfg = config(os.path.join(root, f"fsdp2-{family}"), "fsdp2", family=family, max_train_steps=2,
                     checkpointing_steps=100, method="flowbp-lagrange", method_options={})
        t = Trainer(cfg, adapter=tiny_adapter(family), reward=PixelReward())
        before = {n: p.full_tensor().clone() for n, p in t.adapter.transformer.named_parameters() if "lora" in n}
        losses = t.train().losses
        after = {n: p.full_tensor() for n, p in t.adapter.transformer.named_parameters() if "lora" in n}
        tr = t.adapter.transformer
        blocks = [b for name in BLOCK_LISTS for b in getattr(tr, name, ())]  # every list the trainer shards
        out[family] = {"losses": losses, "root_sharded": isinstance(t.model, FSDPModule),
                       "blocks": len(blocks), "sharded": sorted({type(b).__name__ for b in blocks
                                                                  if isinstance(b, FSDPModule)}),
                       "sharded_count": sum(isinstance(b, FSDPModule) for b in blocks),
                       "lora_moved": bool(before) and any(not torch.equal(before[n], after[n]) for n in before)}
    return out


class Plant:
    """Unpickling it writes a marker file (what an attacker's code would do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w').write('ran')",)


def plant_pickles(root, r):
    from flowbp_train import checkpoint as ckpt

    src = os.path.join(root, "fsdp2-b", "checkpoint-2")
    marker = os.path.join(root, "ran.txt")
    names = sorted(json.load(open(os.path.join(src, ckpt.MANIFEST_FILE)))["files"]) + [ckpt.MANIFEST_FILE]
    out = []
    for name in names:
        for vouched in (False, True) if name != ckpt.MANIFEST_FILE else (False,):
            folder = os.path.join(root, "planted", f"{vouched}-{name.replace('/', '_')}", "checkpoint-2")
            if r == 0:
                shutil.copytree(src, folder)
                torch.save({"state": Plant(marker)}, os.path.join(folder, name))
                if vouched:
                    path = os.path.join(folder, ckpt.MANIFEST_FILE)
                    man = json.load(open(path))
                    man["files"][name] = ckpt.file_entries(ckpt.Path(folder), [name])[name]
                    json.dump(man, open(path, "w"))
            dist.barrier()
            msg = None
            try:
                run(os.path.join(root, "planted-out"), "fsdp2", use_ema=True, resume_from_checkpoint=folder)
            except (ckpt.CheckpointError, ValueError) as exc:
                msg = str(exc)
            dist.barrier()
            out.append({"file": name, "vouched": vouched, "message": msg, "ran": os.path.exists(marker)})
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
