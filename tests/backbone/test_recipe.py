"""The built-in backbone recipe: reproducible builds, and shipped weights used only when they match it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from strata.backbone import tiny

SMALL = dataclasses.replace(tiny.RECIPES["builtin:test"], corpus_size=64, steps=6, batch_size=4)


def test_the_same_recipe_builds_the_same_backbone(tmp_path: Path) -> None:
    a, b = tiny.build(SMALL, tmp_path / "a"), tiny.build(SMALL, tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = tiny.build(dataclasses.replace(SMALL, seed=1), tmp_path / "c")
    assert (a / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_shipped_weights_are_installed_only_when_they_match_the_recipe(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(tiny.RECIPES, "builtin:small", SMALL)
    monkeypatch.setattr(tiny, "SHIPPED", tmp_path / "shipped")
    monkeypatch.setenv("STRATA_CACHE", str(tmp_path / "cache"))
    shipped = tiny.build(SMALL, tmp_path / "shipped" / "small")
    meta = json.loads((shipped / "strata_recipe.json").read_text())
    meta["final_loss"] = "shipped"  # marks the copy: a fresh build would record a number
    (shipped / "strata_recipe.json").write_text(json.dumps(meta))
    got = tiny.ensure_builtin("builtin:small")
    assert json.loads((got / "strata_recipe.json").read_text())["final_loss"] == "shipped"

    stale = dataclasses.replace(SMALL, steps=7)  # the recipe changed, the shipped weights did not
    monkeypatch.setitem(tiny.RECIPES, "builtin:small", stale)
    rebuilt = tiny.ensure_builtin("builtin:small")
    assert rebuilt != got and isinstance(json.loads((rebuilt / "strata_recipe.json").read_text())["final_loss"], float)


def test_every_shipped_backbone_matches_its_recipe() -> None:
    """A recipe change must come with rebuilt weights: python -m strata.backbone.tiny builtin:<name>."""
    for directory in sorted(p for p in tiny.SHIPPED.glob("*") if p.is_dir()):
        recipe = tiny.RECIPES[f"builtin:{directory.name}"]
        assert json.loads((directory / "strata_recipe.json").read_text())["key"] == recipe.key(), directory
