"""The built-in backbone recipe builds reproducibly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from strata.backbone import tiny

SMALL = dataclasses.replace(tiny.RECIPES["builtin:test"], corpus_size=64, vision_steps=4, vision_batch_size=8, steps=6,
                            batch_size=4)


def test_the_same_recipe_builds_the_same_backbone(tmp_path: Path) -> None:
    a, b = tiny.build(SMALL, tmp_path / "a"), tiny.build(SMALL, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = tiny.build(dataclasses.replace(SMALL, seed=1), tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_a_shipped_build_is_copied_not_rebuilt_while_its_key_matches(tmp_path: Path, monkeypatch) -> None:
    shipped = tiny.build(SMALL, tmp_path / "shipped" / "small")
    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(tiny.RECIPES, "builtin:small", SMALL)
    built = []
    real_build = tiny.build
    monkeypatch.setattr(tiny, "build", lambda *a, **k: built.append(a[0]) or real_build(*a, **k))

    got = tiny.ensure_builtin("builtin:small")
    assert got.parent == tmp_path / "cache" / "backbones" and not built
    assert (got / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()

    changed = dataclasses.replace(SMALL, seed=1)  # an edited recipe no longer matches the shipped key
    monkeypatch.setitem(tiny.RECIPES, "builtin:small", changed)
    other = tiny.ensure_builtin("builtin:small")
    assert built == [changed] and tiny.is_build_of(other, changed) and not tiny.is_build_of(other, SMALL)


def test_the_shipped_tiny_backbone_is_a_build_of_the_current_recipe() -> None:
    assert tiny.is_build_of(tiny.SHIPPED / "tiny", tiny.RECIPES["builtin:tiny"]), (
        "the recipe changed: rebuild and ship it with `strata backbone build builtin:tiny --ship`")
