"""The built-in backbone recipe builds reproducibly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from strata.backbone import tiny

SMALL = dataclasses.replace(tiny.RECIPES["builtin:test"], corpus_size=64, vision_steps=4, vision_batch_size=8, steps=6,
                            binding_steps=6, batch_size=4)


def test_the_same_recipe_builds_the_same_backbone(tmp_path: Path) -> None:
    a, b = tiny.build(SMALL, tmp_path / "a"), tiny.build(SMALL, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = tiny.build(dataclasses.replace(SMALL, seed=1), tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()

