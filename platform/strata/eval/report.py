"""Results of a stream: terminal tables for the accuracy matrix and the comparison, and the files
(metrics.json and the heat map) that `strata run` and an open stream both write."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from strata.atomic import write_text
from strata.eval.metrics import Matrix, to_array
from strata.eval.plots import plot_accuracy_matrix
from strata.tracking import mlflow_tracker

MISSING = "—"

# (column header, result key, signed) — deltas get an explicit sign so a drop reads as one.
_COLUMNS = (
    ("FAA", "faa", False),
    ("MFN", "mfn", False),
    ("MFT", "mft", False),
    ("MAA", "maa", False),
    ("BWT", "bwt", True),
    ("FWT", "fwt", True),
    ("F", "forgetting", False),
)


def _fmt(value: Any, signed: bool = False) -> str:
    """One decimal, or MISSING for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{float(value):+.1f}" if signed else f"{float(value):.1f}"


def matrix_table(R: Matrix, tasks: Sequence[str], title: str) -> Table:
    """R as a table: a row per 'after task t', a column per task i, blank where not evaluated."""
    A = to_array(R)
    T = A.shape[0]
    if len(tasks) != T:
        raise ValueError(f"got {len(tasks)} task names but R covers {T} tasks")
    table = Table(title=title)
    table.add_column("after task", style="bold")
    for name in tasks:
        table.add_column(str(name), justify="right")
    for t in range(T):
        cells = ["" if math.isnan(v) else f"{v:.1f}" for v in A[t]]
        table.add_row(str(tasks[t]), *cells)
    return table


def task_table(results: Mapping[str, Mapping[str, Any]], baselines: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per task: its two baselines, then per strategy its accuracy right after learning the
    task (R[t][t]) and at the end of the stream (R[T-1][t])."""
    table = Table(title="per task: baselines, accuracy when learned → at the end (%)")
    table.add_column("task", style="bold")
    table.add_column("constant", justify="right")
    table.add_column("pixels", justify="right")
    for name in results:
        table.add_column(str(name), justify="right")
    tasks = next(iter(results.values()))["tasks"] if results else []
    for i, task in enumerate(tasks):
        cells = [_fmt(baselines.get(task, {}).get("constant")), _fmt(baselines.get(task, {}).get("pixels"))]
        for r in results.values():
            A = to_array(r["accuracy_matrix"])
            cells.append(f"{_fmt(A[i, i])} → {_fmt(A[-1, i])}")
        table.add_row(str(task), *cells)
    return table


def comparison_table(results: Mapping[str, Mapping[str, Any]]) -> Table:
    """One row per strategy: FAA, MFN, MFT, MAA, BWT, FWT, F, router acc (if any), and gate failures."""
    with_router = any("router_accuracy" in r for r in results.values())
    table = Table(title="strategy comparison")
    table.add_column("strategy", style="bold")
    for header, _, _ in _COLUMNS:
        table.add_column(header, justify="right")
    if with_router:
        table.add_column("router acc", justify="right")
    table.add_column("gate failed", justify="right")
    for name, r in results.items():
        cells = [_fmt(r.get(key), signed) for _, key, signed in _COLUMNS]
        if with_router:
            cells.append(_fmt(r.get("router_accuracy")))
        gate = r.get("gate", {})
        cells.append(f"{len(gate.get('failed', []))}/{len(r.get('tasks', []))}"
                     + (" (kept)" if gate.get("mode") == "report" and gate.get("failed") else ""))
        table.add_row(str(name), *cells)
    return table


def save_results(out: Path, name: str, R: np.ndarray, tasks: list[str], metrics: dict) -> dict:
    """Write `<out>/metrics.json` (R with NaN as null, strict JSON) and `<out>/accuracy_matrix.png`.

    Returns `metrics` with `tasks` and `accuracy_matrix` filled in, as written.
    """
    matrix = [[None if np.isnan(x) else float(x) for x in row] for row in R]  # JSON has no NaN
    metrics = {"strategy": name, "tasks": tasks, "accuracy_matrix": matrix, **metrics}
    write_text(Path(out) / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False))
    plot_accuracy_matrix(R, tasks, Path(out) / "accuracy_matrix.png", title=f"{name}: accuracy (%)")
    if tracker := mlflow_tracker(Path(out)):
        tracker.log_results(Path(out))
    return metrics
