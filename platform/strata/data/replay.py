"""A per-task reservoir replay buffer stored as Parquet, with a recorded purge for privacy."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from strata.config import check_name
from strata.data.schema import write_table


def reservoir_indices(n: int, k: int, seed: int) -> list[int]:
    """Algorithm R over a stream of n rows: a uniform sample of min(n, k) row indices."""
    rng = random.Random(seed)
    keep = list(range(min(n, k)))
    for i in range(k, n):
        j = rng.randint(0, i)
        if j < k:
            keep[j] = i
    return sorted(keep)


class ReplayBuffer:
    """One Parquet file of reservoir rows per task under `root`, plus a purge log."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, task: str) -> Path:
        return self.root / f"{check_name(task, 'task name')}.parquet"

    def add(self, task: str, table: pa.Table, k: int, seed: int) -> int:
        """Keep a reservoir of k rows of `task` (replacing any earlier one); returns rows kept."""
        sample = table.take(reservoir_indices(table.num_rows, k, seed))
        write_table(sample, self._path(task))
        return sample.num_rows

    def tasks(self) -> list[str]:
        """Tasks that currently have rows in the buffer."""
        return sorted(p.stem for p in self.root.glob("*.parquet")) if self.root.exists() else []

    def read(self, task: str) -> pa.Table:
        """The rows kept for one task."""
        return pq.read_table(self._path(task))

    def rows(self, exclude: str | None = None) -> pa.Table | None:
        """All stored rows (except task `exclude`), or None when the buffer is empty."""
        tables = [self.read(t) for t in self.tasks() if t != exclude]
        return pa.concat_tables(tables) if tables else None

    def purge(self, task: str, reason: str = "") -> int:
        """Delete a task's raw rows and append the purge to `purges.jsonl`; returns rows removed."""
        path = self._path(task)
        if not path.exists():
            raise KeyError(f"replay buffer has no rows for task {task!r} (known: {self.tasks()})")
        removed = pq.read_metadata(path).num_rows
        path.unlink()
        record = {"task": task, "rows": removed, "reason": reason, "time": time.time()}
        with open(self.root / "purges.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        return removed
