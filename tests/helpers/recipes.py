"""What every recipe resolves to, recorded as the JSON fixture ``tests/train/recipes_resolved.json``.

``PYTHONPATH=tests python -m helpers.recipes`` writes, for each ``recipes/<family>/<method>.yaml`` (and
each ``recipes/<family>/<task>/<method>.yaml``, the miniature study's tasks), the
configuration ``flowbp_train.config.load_config(recipe, check=False)`` builds (``TrainConfig.to_dict()``,
JSON-encoded). The fixture was generated from main before the recipes were given base files (issue 14)
and is the reference ``test_recipes_resolve_as_recorded`` compares against: rerun this script only when a
recipe is changed on purpose, and say so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

from helpers import ROOT, TESTS

FIXTURE = TESTS / "train" / "recipes_resolved.json"


def recipe_files() -> list[Path]:
    """Every runnable recipe: ``recipes/<family>/<method>.yaml`` and ``recipes/<family>/<task>/<method>.yaml``
    (files starting with ``_`` are bases)."""
    return sorted(p for pattern in ("*/*.yaml", "*/*/*.yaml") for p in (ROOT / "recipes").glob(pattern)
                  if not p.name.startswith("_"))


def resolve_all() -> dict[str, dict]:
    from flowbp_train.config import load_config

    return {str(p.relative_to(ROOT)): json.loads(json.dumps(load_config(p, check=False).to_dict()))
            for p in recipe_files()}


def main() -> int:
    FIXTURE.write_text(json.dumps(resolve_all(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
