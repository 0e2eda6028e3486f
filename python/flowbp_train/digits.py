"""What the CPU miniature's model, rewards and tools share: its prompts, its image size, its weights folder.

The miniature generates 16x16 handwritten digits from prompts "a handwritten digit <word>" and a few
paraphrases (shared/design/MINIATURE.md); the null prompt "" is the negative branch of classifier-free
guidance. The adapter (``models/mini.py``: the text encoder's vocabulary), the rewards
(``rewards/mini.py``: which digit a prompt asks for), the tools of ``flowbp_train.mini`` and the trainer's
named prompt set ``prompts: mini`` all read them here, so none of them imports another for them. The
committed, hash-checked weights live in :data:`WEIGHTS_DIR` (``flowbp_train/mini/weights``).
"""

from __future__ import annotations

from pathlib import Path

IMAGE_SIZE = 16
NUM_CLASSES = 10
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: Templates of the prompts; the first is the canonical one used for evaluation grids.
TEMPLATES = ("a handwritten digit {}", "the handwritten digit {}", "a drawn number {}", "digit {}")
NULL_PROMPT = ""
#: The committed weights of the base model, the reward CNN and the judge, with their ``sha256.json``.
WEIGHTS_DIR = Path(__file__).resolve().parent / "mini" / "weights"


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt of ``digit`` (0-9) with template index ``template`` (0 is canonical)."""
    if not isinstance(digit, int) or not 0 <= digit < NUM_CLASSES:
        raise ValueError(f"digit must be an integer in 0..9, got {digit!r}")
    if not isinstance(template, int) or not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template must be an integer in 0..{len(TEMPLATES) - 1}, got {template!r}")
    return TEMPLATES[template].format(WORDS[digit])


def canonical_prompts() -> list[str]:
    """The ten canonical prompts, digit 0 to 9."""
    return [prompt_for(d) for d in range(NUM_CLASSES)]


def all_prompts() -> list[str]:
    """Every prompt (all templates, all digits), template by template: the named prompt set ``mini``."""
    return [prompt_for(d, t) for t in range(len(TEMPLATES)) for d in range(NUM_CLASSES)]


def digit_of_prompt(prompt: str) -> int:
    """The digit a prompt asks for: its last word must be one of :data:`WORDS`."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = prompt.strip().lower().split()
    if not words or words[-1] not in WORDS:
        raise ValueError(f"prompt must end with a digit word ({', '.join(WORDS)}), got {prompt!r}")
    return WORDS.index(words[-1])


def digits_of_prompts(prompts):
    """``[B]`` long tensor of the digits the prompts ask for."""
    import torch

    return torch.tensor([digit_of_prompt(p) for p in prompts], dtype=torch.long)
