"""The life of one arriving task for one strategy (DESIGN §2), shared by `strata run` and the jobs.

begin (coordinator) → mix rows → train (Ray Train or in-process) → install → strategy bookkeeping
→ evaluate every task seen so far → record (coordinator: evaluated, then promoted). There is no
promotion gate yet: every candidate that trains and evaluates is promoted.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from strata.backbone.load import load_backbone
from strata.config import RunConfig
from strata.coordinator import Coordinator
from strata.data.collate import Encoded
from strata.data.schema import read_table, write_table
from strata.eval.evaluate import TaskResult, evaluate_task
from strata.strategies import make_strategy
from strata.strategies.base import Strategy, TaskContext
from strata.strategies.cma import FREEZE_FILE
from strata.train.driver import TaskJob, fit_local, fit_task, install


def job_owner() -> str:
    """Who is driving: the Ray job's submission id, or host:pid plus a random suffix."""
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def tree_hash(root: Path) -> str:
    """A content hash over every file under `root` (names and bytes), for lineage and checks."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@dataclass
class StrategyStream:
    """One strategy's stream: its state on disk, its coordinator record, and who drives it."""

    cfg: RunConfig
    name: str
    backbone_path: Path
    coord: Coordinator
    owner: str = field(default_factory=job_owner)

    def __post_init__(self) -> None:
        self.strategy: Strategy = make_strategy(self.name, self.cfg)
        self.out = Path(self.cfg.out).resolve() / self.name
        self.state_dir = self.out / "state"

    def learned(self) -> list[str]:
        """Tasks this strategy has promoted so far, in order."""
        return [e["task"] for e in self.coord.timeline(self.name) if e["status"] == "promoted"]

    def context(self, task: str, train_paths: dict[str, str]) -> TaskContext:
        """The TaskContext of `task` arriving after every promoted task."""
        seen = tuple(self.learned())
        return TaskContext(len(seen), task, seen, {**train_paths}, str(self.state_dir), self.cfg.seed)


def eval_model(cfg: RunConfig, backbone_path: Path, strategy: Strategy, ctx: TaskContext | None):
    """A fresh backbone with the strategy's adapters after task `ctx` (None: the bare backbone)."""
    model, processor = load_backbone(cfg.backbone, backbone_path)
    return (strategy.load_eval(model, ctx) if ctx else model), processor


def evaluate_all(model, processor, strategy, ctx, tests: dict[str, Encoded], batch_size: int) -> dict[str, TaskResult]:
    """Evaluate every given task, routing each row as the strategy would at inference."""
    results = {}
    for task, enc in tests.items():
        names = strategy.route(ctx, model, processor, enc, task) if ctx else [None] * len(enc)
        results[task] = evaluate_task(model, processor, enc, names, batch_size)
    return results


def learn_task(s: StrategyStream, task: str, train_paths: dict[str, str],
               tests: dict[str, Encoded]) -> tuple[dict[str, TaskResult], dict]:
    """Train, evaluate and record one task; returns the evaluation per task in `tests` and training metrics.

    `train_paths` maps every task seen so far and `task` to its train rows. The coordinator refuses
    a task another job is training; a failure marks the task failed and re-raises.
    """
    ctx = s.context(task, train_paths)
    entry = s.coord.begin_task(s.name, task, s.owner)
    try:
        trained = train(s, ctx, entry["run_id"])
        model, processor = eval_model(s.cfg, s.backbone_path, s.strategy, ctx)
        s.strategy.after_task(ctx, read_table(train_paths[task]), model, processor)
        results = evaluate_all(model, processor, s.strategy, ctx, tests, s.cfg.eval_batch_size)
        accuracy = {t: r.accuracy for t, r in results.items()}
        s.coord.set_status(s.name, task, s.owner, "evaluated", accuracy=accuracy)
        s.coord.commit_task(s.name, task, s.owner, "promoted", record(s, ctx, accuracy, trained))
    except BaseException as e:
        s.coord.set_status(s.name, task, s.owner, "failed", reasons=[f"{type(e).__name__}: {e}"])
        raise
    return results, trained


def train(s: StrategyStream, ctx: TaskContext, run_id: str) -> dict:
    """Mix the rows and train the task on Ray Train (or in this process); returns the final metrics."""
    rows_path = s.state_dir / "rows.parquet"
    write_table(s.strategy.training_table(ctx, read_table(ctx.train_paths[ctx.name])), rows_path)
    job = TaskJob(s.strategy, ctx, str(rows_path), s.cfg.train, s.cfg.backbone, str(s.backbone_path))
    if s.cfg.train.executor == "local":
        trained = fit_local(job)
    else:
        storage = s.cfg.train.storage_path or str(s.out / "ray")
        trained = fit_task(job, storage, f"{s.name}-{ctx.index:02d}-{ctx.name}-{run_id}")
    return {k: v for k, v in trained.items() if isinstance(v, (int, float, str))}


def record(s: StrategyStream, ctx: TaskContext, accuracy: dict, trained: dict) -> dict:
    """What the coordinator keeps for a promoted task: pointers and hashes, never tensors."""
    name = s.strategy.adapter_name(ctx)
    adapters = s.coord.snapshot()["strategies"].get(s.name, {}).get("adapters", {})
    version = len(adapters.get(name, [])) + 1
    kept = s.out / "versions" / name / f"v{version}"
    install(ctx.adapters_dir / name, kept)  # the version stays readable after later tasks replace the adapter
    freeze = s.state_dir / FREEZE_FILE
    return {
        "adapter": {"name": name, "path": str(kept), "sha256": tree_hash(kept)},
        "freeze": json.loads(freeze.read_text())["masks"] if freeze.exists() else {},
        "replay": replay_index(s.state_dir),
        "accuracy": accuracy,
        "metrics": trained,
    }


def replay_index(state_dir: Path) -> dict[str, dict]:
    """Row counts and hashes of every replay or memory reservoir file (the rows stay in storage)."""
    index = {}
    for path in sorted(state_dir.glob("*/*.parquet")):
        if path.parent.name in ("buffer", "memory"):
            index[f"{path.parent.name}/{path.stem}"] = {
                "rows": pq.read_metadata(path).num_rows,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:16],
            }
    return index
