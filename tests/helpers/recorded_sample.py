"""The sample that tests/train/mini/test_base_model.py reproduces, and the script that records it.

Record from the repository root: ``OMP_NUM_THREADS=1 PYTHONPATH=tests python -m helpers.recorded_sample``.
It loads the committed base weights, samples four prompts (CFG 2.0, 10 Euler steps, noise seed 7, one
thread) and writes ``tests/train/mini/recorded_sample.safetensors`` with the sha256 of the weights it used.
"""

from __future__ import annotations

import torch

from helpers import TESTS

PROMPTS = ["a handwritten digit zero", "the handwritten digit three", "a drawn number seven", "digit eight"]
GUIDANCE, STEPS, SEED = 2.0, 10, 7
OUT = TESTS / "train" / "mini" / "recorded_sample.safetensors"


def make_sample() -> torch.Tensor:
    from flowbp_train.mini.report import generate
    from flowbp_train.models.mini import MiniAdapter

    ad = MiniAdapter.from_pretrained("mini", guidance_scale=GUIDANCE)
    noise = ad.initial_noise(len(PROMPTS), torch.Generator().manual_seed(SEED))
    return generate(ad, PROMPTS, noise, STEPS)


if __name__ == "__main__":
    from safetensors.torch import save_file

    from flowbp_train.digits import WEIGHTS_DIR
    from flowbp_train.models.mini import BASE_FILE
    from flowbp_train.weights import sha256_of

    torch.set_num_threads(1)
    save_file({"sample": make_sample().contiguous()}, str(OUT),
              metadata={"weights_sha256": sha256_of(WEIGHTS_DIR / BASE_FILE)})
    print(f"wrote {OUT}")
