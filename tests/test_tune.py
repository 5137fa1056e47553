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



def test_a_launch_may_replace_the_sweeps_options_and_a_bad_one_is_named() -> None:
    from strata.tune import option_flags, with_options

    smoke = load_sweep(SPACES[[p.stem for p in SPACES].index("smoke")])
    options = {"num_samples": "3", "scheduler": "fifo", "max_concurrent_trials": "", "cpus_per_trial": "0.5",
               "gpus_per_trial": None}
    changed = with_options(smoke, options)
    assert (changed.num_samples, changed.scheduler, changed.cpus_per_trial) == (3, "fifo", 0.5)
    assert changed.max_concurrent_trials == smoke.max_concurrent_trials  # empty: the file's
    assert option_flags(options) == ["--num-samples", "3", "--scheduler", "fifo", "--cpus-per-trial", "0.5"]
    for bad, message in [({"num_samples": "many"}, "num_samples must be a int"), ({"num_samples": "0"}, ">= 1"),
                         ({"scheduler": "pbt"}, "scheduler must be one of"), ({"cpus_per_trial": "-1"}, ">= 0"),
                         ({"max_concurrent_trials": "0"}, "max_concurrent_trials must be >= 1"),
                         ({"samples": "2"}, "unknown sweep option 'samples'")]:
        with pytest.raises(ValueError, match=message):
            with_options(smoke, bad)
