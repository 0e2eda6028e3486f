"""The default LoRA targets of each family on its published architecture (the one shipped for the memory
planner), built on the meta device (no weights, no memory): peft injects every target, every transformer block
carries a LoRA, and the targets cover at least the stated share of the blocks' linear weights."""

from __future__ import annotations

import re

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

FAMILIES = ("flux1", "sd3", "flux2")
#: lower bounds on the share of the blocks' linear weight elements under a LoRA (measured: FLUX.1-dev 0.727,
#: SD3.5-Medium 0.657, FLUX.2-Klein-base-9B 1.000; what is left out is the adaLN modulation linears of the
#: FLUX.1 and SD3 blocks; diffusers' example defaults give 0.455, 0.203 and 0.062)
MIN_COVERAGE = {"flux1": 0.70, "sd3": 0.65, "flux2": 0.99}
# FLUX.2-dev (measured 1.000: the Klein block layout) and Z-Image (measured 0.980: every attention and SwiGLU
# projection of the main and refiner blocks; the adaLN modulation linears are left out; diffusers'
# train_dreambooth_lora_z_image.py defaults, the attention only, give 0.327)
FAMILIES += ("flux2-dev", "z-image")
MIN_COVERAGE.update({"flux2-dev": 0.99, "z-image": 0.97})
#: architecture files of the families the memory planner does not map yet (read here directly)
SHIPPED = {"flux2-dev": "flux2-dev.json", "z-image": "z-image.json"}
BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks|layers|noise_refiner|context_refiner)\.(\d+)\.")


def _published(family: str) -> torch.nn.Module:
    import json

    from flowbp_train.memory.build import ARCHITECTURES, FAMILY_FILES, load_architecture

    if family in FAMILY_FILES:
        spec = load_architecture(family)["transformer"]
    else:
        spec = json.loads((ARCHITECTURES / SHIPPED[family]).read_text())["transformer"]
    with torch.device("meta"):
        return getattr(diffusers, spec["class"])(**spec["config"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_default_targets_cover_the_published_blocks(family):
    from peft import LoraConfig

    from flowbp_train.models import adapter_class

    model = _published(family)
    linears = {n: m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and BLOCK.match(n)}
    blocks = {BLOCK.match(n).group(0) for n in linears}
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=adapter_class(family).lora_targets(model)))
    wrapped = {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}
    in_blocks = {n for n in wrapped if BLOCK.match(n)}
    assert in_blocks, "no LoRA inside the transformer blocks"
    assert {BLOCK.match(n).group(0) for n in in_blocks} == blocks  # every block carries a LoRA
    covered = sum(linears[n] for n in in_blocks if n in linears)
    share = covered / sum(linears.values())
    assert share >= MIN_COVERAGE[family], f"{family}: LoRA covers {share:.3f} of the blocks' linear weights"
    assert wrapped == in_blocks  # nothing outside the blocks (e.g. the final proj_out) is trained
