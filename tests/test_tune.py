"""Tune sweeps: every YAML in tune_spaces/ is valid, and the smoke sweep runs for real with ASHA."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml

from strata.cli import build_run_config
from strata.tune import load_sweep, run_config, sweep_run

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


@pytest.mark.integration
def test_asha_stops_the_known_bad_trial_and_the_best_config_runs(ray_with_dashboard, backbone_dir, tmp_path) -> None:
    from ray.util.state import list_actors

    sweep = dataclasses.replace(load_sweep(SPACES[[p.stem for p in SPACES].index("smoke")]), out=str(tmp_path))
    grid = sweep_run(sweep)

    assert len(grid) == 4 and grid.num_errors == 0
    done = {r.config["train.lr"]: r.metrics["tasks"] for r in grid}
    assert sorted(done) == [0.0, 0.003, 0.005, 0.01]
    assert min(done.values()) < sweep.tasks  # at least one trial was stopped early ...
    assert done[0.0] == 1  # ... the lr = 0 control among them, after its first task
    history = {r.config["train.lr"]: r.metrics_dataframe["faa"].tolist() for r in grid}
    assert all(len(h) == done[lr] for lr, h in history.items())  # FAA reported after every task
    best = grid.get_best_result(metric="faa", mode="max", scope="last")
    assert best.config["train.lr"] > 0

    # The trials were real Ray actors, seen by the state API.
    # Name this cluster: with no address the state API may pick another live or stale cluster on the machine.
    address = ray_with_dashboard.get_runtime_context().gcs_address
    deadline = time.monotonic() + 60
    while len(trials := list_actors(address=address, filters=[("class_name", "=", "ImplicitFunc")], limit=100)) < 4:
        assert time.monotonic() < deadline, f"the state API shows {len(trials)} trial actors, not 4"
        time.sleep(1)

    out = tmp_path / "smoke"
    assert (out / "summary.json").exists() and (out / "sweep.png").stat().st_size > 0
    best_cfg = build_run_config(out / "best.yaml", [], None, None, None, None, None, None, None, None)
    assert best_cfg.train.lr == best.config["train.lr"] and best_cfg.strategies == ("dgg",)
    assert best_cfg == dataclasses.replace(run_config(sweep, best.config, best_cfg.out),
                                           train=dataclasses.replace(best_cfg.train, executor="ray"))
