"""Replay buffer: uniform deterministic reservoirs, per-task Parquet, purges that are recorded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from strata.data.replay import ReplayBuffer, reservoir_indices


def test_reservoir_is_deterministic_sorted_and_in_range() -> None:
    a = reservoir_indices(1000, 10, seed=3)
    assert a == reservoir_indices(1000, 10, seed=3)
    assert a != reservoir_indices(1000, 10, seed=4)
    assert len(a) == len(set(a)) == 10
    assert a == sorted(a) and all(0 <= i < 1000 for i in a)


def test_reservoir_keeps_everything_when_k_exceeds_n() -> None:
    assert reservoir_indices(5, 10, seed=0) == [0, 1, 2, 3, 4]
    assert reservoir_indices(5, 5, seed=0) == [0, 1, 2, 3, 4]
    assert reservoir_indices(0, 3, seed=0) == []
    assert reservoir_indices(7, 0, seed=0) == []


def test_reservoir_is_uniform_ish() -> None:
    n, k, trials = 20, 5, 2000
    counts = Counter(i for seed in range(trials) for i in reservoir_indices(n, k, seed))
    expected = trials * k / n  # 500 per index
    # Binomial sd is ~19; 4 sd either side. A biased sampler (e.g. one that favours the first k
    # rows or the tail) lands far outside this.
    assert all(abs(counts[i] - expected) < 80 for i in range(n)), counts
    first_k, last_k = sum(counts[i] for i in range(k)), sum(counts[i] for i in range(n - k, n))
    assert abs(first_k - last_k) < 200


def rows(task: str, n: int) -> pa.Table:
    return pa.table({"id": [f"{task}-{i}" for i in range(n)], "prompt": ["q"] * n})


def test_add_rows_and_exclude(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path / "buffer")
    assert buf.tasks() == [] and buf.rows() is None
    assert buf.add("colour", rows("colour", 30), k=4, seed=0) == 4
    assert buf.add("shape", rows("shape", 3), k=4, seed=1) == 3  # fewer rows than k: keep all
    assert buf.tasks() == ["colour", "shape"]
    everything = buf.rows()["id"].to_pylist()
    assert len(everything) == 7
    colour = [i for i in everything if i.startswith("colour-")]
    expected = [f"colour-{i}" for i in reservoir_indices(30, 4, seed=0)]
    assert colour == expected
    assert sorted(buf.rows(exclude="colour")["id"].to_pylist()) == ["shape-0", "shape-1", "shape-2"]
    assert buf.rows(exclude="unknown").num_rows == 7


def test_add_replaces_a_task_reservoir(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path)
    buf.add("colour", rows("colour", 30), k=6, seed=0)
    buf.add("colour", rows("colour", 30), k=2, seed=1)
    assert buf.rows().num_rows == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["colour.parquet"]  # no temp files


def test_purge_removes_rows_and_records_it(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path)
    buf.add("colour", rows("colour", 30), k=5, seed=0)
    buf.add("shape", rows("shape", 30), k=3, seed=0)
    assert buf.purge("colour", reason="privacy request 17") == 5
    assert buf.tasks() == ["shape"]
    assert not (tmp_path / "colour.parquet").exists()
    assert not any(i.startswith("colour") for i in buf.rows()["id"].to_pylist())
    assert buf.purge("shape") == 3
    assert buf.rows() is None
    log = [json.loads(line) for line in (tmp_path / "purges.jsonl").read_text().splitlines()]
    assert [(r["task"], r["rows"]) for r in log] == [("colour", 5), ("shape", 3)]
    assert log[0]["reason"] == "privacy request 17"
    assert log[0]["time"] <= log[1]["time"]


def test_purge_unknown_task_names_the_known_ones(tmp_path: Path) -> None:
    buf = ReplayBuffer(tmp_path)
    buf.add("colour", rows("colour", 3), k=3, seed=0)
    with pytest.raises(KeyError, match=r"'count'.*known: \['colour'\]"):
        buf.purge("count")
    assert not (tmp_path / "purges.jsonl").exists()  # a failed purge records nothing
    assert buf.rows().num_rows == 3


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".hidden"])
def test_bad_task_names_refused(tmp_path: Path, bad: str) -> None:
    buf = ReplayBuffer(tmp_path / "buffer")
    with pytest.raises(ValueError, match="invalid task name"):
        buf.add(bad, rows("x", 3), k=2, seed=0)
    with pytest.raises(ValueError, match="invalid task name"):
        buf.purge(bad)
    assert not any(p.suffix == ".parquet" for p in tmp_path.rglob("*"))
