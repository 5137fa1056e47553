"""An open-ended stream: tasks arrive one job at a time (`arrive`), and any version can be re-evaluated.

The stream lives under `cfg.out`: validated datasets in `data/`, each strategy's state, versions
and metrics in `<strategy>/`, and its coordinator state in `cfg.storage` (default
`<out>/coordinator`). The accuracy matrix is rebuilt from the coordinator's timeline, so an
arrival never depends on what an earlier job held in memory.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from strata.arrival import StrategyStream, eval_model, evaluate_all, learn_task
from strata.atomic import write_text
from strata.backbone.load import resolve, shared_backbone
from strata.config import RunConfig, check_name
from strata.data.collate import encode_table
from strata.data.schema import load_dataset, read_table, write_table
from strata.eval.metrics import summarize
from strata.eval.report import matrix_table, save_results
from strata.hooks import TaskContext
from strata.pipeline import coordinator, split
from strata.registry import Ref
from strata.train.driver import init_ray


def open_stream(cfg: RunConfig, strategy: str) -> StrategyStream:
    """The strategy's stream under cfg.out, with its backbone resolved and Ray joined if needed."""
    if strategy not in cfg.strategies:
        cfg = RunConfig(**{**cfg.__dict__, "strategies": (strategy,)})
    backbone_path = resolve(cfg.backbone)
    if cfg.train.executor == "ray":
        init_ray()
    return StrategyStream(cfg, strategy, backbone_path, coordinator(cfg))


def data_dir(cfg: RunConfig) -> Path:
    """Where the stream keeps each arrived task's validated dataset."""
    return Path(cfg.out).resolve() / "data"


def arrive(cfg: RunConfig, strategy: str, task: str, dataset: Path, console: Console | None = None) -> dict:
    """Validate a new task's dataset, then train, evaluate and record it; returns the stream's metrics.

    A bad dataset raises DatasetError before anything is written or registered.
    """
    console = console or Console()
    check_name(task, "task name")
    table = load_dataset(dataset)  # validation first: a rejected dataset leaves no trace
    s = open_stream(cfg, strategy)
    if task in s.learned():
        raise ValueError(f"task {task!r} was already learned by {strategy!r} in stream {cfg.stream!r}")
    write_table(table, data_dir(cfg) / f"{task}.parquet")
    write_table(split(table, "train"), data_dir(cfg) / f"{task}.train.parquet")
    tasks = [*s.learned(), task]
    console.log(f"{strategy}: task {task!r} arrives as number {len(tasks)} of stream {cfg.stream!r}")
    train_paths = {t: str(data_dir(cfg) / f"{t}.train.parquet") for t in tasks}
    _, processor = shared_backbone(cfg.backbone, s.backbone_path)
    vals = {t: split(read_table(data_dir(cfg) / f"{t}.parquet"), "val") for t in tasks}
    results, trained = learn_task(s, task, train_paths, test_sets(cfg, processor, tasks), vals)
    entry = next(e for e in s.coord.timeline(strategy) if e["task"] == task)
    console.log(f"{strategy}: {task!r} trained in {trained.get('train_seconds', 0):.1f} s, candidate "
                f"{entry.get('candidate')} {entry['status']}; served test accuracy {results[task].accuracy:.1f}")
    for reason in entry.get("reasons", []):
        console.log(f"  gate: {reason}")
    return write_metrics(s, console)


def test_sets(cfg: RunConfig, processor, tasks: list[str]) -> dict:
    """Encoded `test` rows of each arrived task."""
    # Validated once at arrival; re-reading skips the image decoding of validation.
    return {t: encode_table(processor, split(read_table(data_dir(cfg) / f"{t}.parquet"), "test"),
                            with_answers=False) for t in tasks}


def write_metrics(s: StrategyStream, console: Console) -> dict:
    """Rebuild R from the coordinator's timeline, print it, and write metrics.json and the heat map."""
    entries = [e for e in s.coord.timeline(s.name) if e["status"] == "promoted"]
    tasks = [e["task"] for e in entries]
    R = np.full((len(tasks), len(tasks)), np.nan)
    for t, entry in enumerate(entries):
        for i, other in enumerate(tasks[: t + 1]):
            R[t, i] = entry["accuracy"][other]
    sizes = [len(split(pq.read_table(data_dir(s.cfg) / f"{t}.parquet", columns=["split"]), "test")) for t in tasks]
    metrics = save_results(s.out, s.name, R, tasks, {"stream": s.cfg.stream,
                                                     "versions": [e.get("version") for e in entries],
                                                     **summarize(R, sizes)})
    console.print(matrix_table(metrics["accuracy_matrix"], tasks, f"{s.name} on stream {s.cfg.stream}: R[t][i] (%)"))
    return metrics


def evaluate(cfg: RunConfig, strategy: str, version: int | None = None, console: Console | None = None) -> dict:
    """Re-evaluate a strategy's adapters on every arrived task's test rows: the latest, or version N.

    A version number picks one snapshot of a shared adapter; Decoupled keeps one adapter per task,
    so its version set is always the latest adapter of every task.
    """
    console = console or Console()
    s = open_stream(cfg, strategy)
    tasks = s.learned()
    if not tasks:
        raise ValueError(f"{strategy!r} has learned no task in stream {cfg.stream!r} yet")
    ctx = s.served_context()
    with tempfile.TemporaryDirectory() as tmp:
        if version is not None:
            ctx = pinned(s, ctx, version, Path(tmp))
        model, processor = eval_model(cfg, s.backbone_path, s.strategy, ctx)
        results = evaluate_all(model, processor, s.strategy, ctx, test_sets(cfg, processor, tasks),
                               cfg.eval_batch_size)
    row = {t: r.accuracy for t, r in results.items()}
    label = f"v{version}" if version else "latest"
    table = Table(title=f"{strategy} ({label}) on stream {cfg.stream}: test accuracy (%)")
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_row(*(f"{row[t]:.1f}" for t in tasks))
    console.print(table)
    report = {"strategy": strategy, "version": version, "accuracy": row}
    write_text(s.out / f"evaluate-{label}.json", json.dumps(report, indent=2))
    return report


def pinned(s: StrategyStream, ctx: TaskContext, version: int, tmp: Path) -> TaskContext:
    """A context whose adapters directory holds registry version `version` of the shared adapter (hash-checked)."""
    if not s.strategy.shared:
        raise ValueError(f"{s.name!r} keeps one adapter per task; evaluate it without --version")
    ref = Ref(s.cfg.stream, s.registry_adapter(ctx.name), version)
    s.registry.fetch(ref, tmp / "adapters" / s.strategy.adapter_name(ctx))
    return TaskContext(ctx.index, ctx.name, ctx.seen, {}, str(tmp), ctx.seed)
