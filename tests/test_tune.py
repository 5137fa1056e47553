"""Tune sweeps: every YAML in tune_spaces/ is valid, and a bad one is refused with the field named.

The smoke sweep runs for real, with ASHA, as a Ray job on a multi-node cluster: tests/test_cluster_workflows.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from strata.tune import load_sweep

SPACES = sorted((Path(__file__).resolve().parents[1] / "tune_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_space_is_valid(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.space and sweep.tasks >= 2  # ASHA needs at least one task before its last


def test_bad_sweeps_are_refused_with_the_field_named(tmp_path: Path) -> None:
    smoke = yaml.safe_load(SPACES[[p.stem for p in SPACES].index("smoke")].read_text())
    for change, message in [({"metric": "accuracy"}, "sweep metric must be one of"),
                            ({"scheduler": "pbt"}, "sweep scheduler must be one of"),
                            ({"space": {"train.lr": {"normal": [0, 1]}}}, r"space.train.lr must be a constant"),
                            ({"space": {"train.steps": {"grid": [10, 0]}}}, "train.steps must be >= 1"),
                            ({"space": {"adapter.colour": 3}}, "unknown key.*adapter: colour")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**smoke, **change}))
        with pytest.raises(ValueError, match=message):
            load_sweep(path)

