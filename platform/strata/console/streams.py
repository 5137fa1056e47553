"""A stream as the console shows it, read from its output directory: the coordinator's timeline, the
accuracy matrix it implies, each strategy's metrics, and per-task training curves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from strata.config import check_name
from strata.eval.metrics import METRIC_KEYS
from strata.tracking import MLFLOW_FILE, read_scalars


@dataclass(frozen=True)
class StreamDir:
    """One stream: `<runs>/<out>/coordinator/<stream>/coordinator.json`."""

    out: str
    stream: str

    def root(self, runs: Path) -> Path:
        """The stream's output directory (names validated: they come from URLs)."""
        return runs / check_name(self.out, "run directory")

    def coordinator(self, runs: Path) -> Path:
        """The coordinator's state file of this stream."""
        return self.root(runs) / "coordinator" / check_name(self.stream, "stream name") / "coordinator.json"


def find_streams(runs: Path) -> list[StreamDir]:
    """Every stream with a coordinator file under the runs root."""
    return [StreamDir(p.parents[2].name, p.parent.name) for p in sorted(runs.glob("*/coordinator/*/coordinator.json"))]


def read_stream(runs: Path, where: StreamDir) -> dict:
    """Per strategy: the task timeline, the accuracy matrix, the metrics and the training curves."""
    path = where.coordinator(runs)
    if not path.is_file():
        raise FileNotFoundError(f"no stream {where.stream!r} in {where.root(runs)}")
    state = json.loads(path.read_text())
    return {name: strategy_view(where.root(runs) / name, st.get("timeline", []))
            for name, st in state.get("strategies", {}).items()}


def strategy_view(out: Path, timeline: list[dict]) -> dict:
    """One strategy's stream: timeline rows, the matrix (row i: every task's accuracy after learning task i)."""
    tasks = [e["task"] for e in timeline]
    rows = [{"task": e["task"], "status": e["status"], "attempt": e.get("attempt"), "version": e.get("version"),
             "times": {h["status"]: h["time"] for h in e.get("history", [])},
             "reasons": (e.get("gate") or {}).get("reasons", []), "error": e.get("error")} for e in timeline]
    matrix = [[e["accuracy"].get(t) for t in tasks] for e in timeline if e.get("accuracy")]
    metrics_file = out / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {"timeline": rows, "tasks": tasks, "matrix": matrix,
            "metrics": {k: metrics[k] for k in METRIC_KEYS if metrics.get(k) is not None},
            "baselines": metrics.get("baselines", {}), "curves": read_scalars(out / "tensorboard"),
            "running": any(r["status"] in ("arrived", "training", "evaluated") for r in rows),
            "mlflow": mlflow_link(out)}


def mlflow_link(out: Path) -> dict | None:
    """Where the strategy's MLflow run is: a URL for a tracking server, else the store and run id."""
    path = out / MLFLOW_FILE
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    url = f"{run['uri'].rstrip('/')}/#/experiments/{run['experiment_id']}/runs/{run['run_id']}" \
        if run["uri"].startswith(("http://", "https://")) else None
    return {**run, "url": url}
