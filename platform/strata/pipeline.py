"""The continual run: for each strategy, learn the stream task by task and fill the accuracy matrix.

Per task, `arrival.learn_task`: begin in the coordinator → train on Ray Train → strategy
bookkeeping → registry push → gate → promote or reject. The same code runs on a laptop and in a Ray job.
"""

from __future__ import annotations

import dataclasses
import json
import platform as py_platform
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from rich.console import Console
from rich.progress import Progress

from strata.adapters.placement import check, check_kind
from strata.arrival import StrategyStream, evaluate_all, learn_task, training_session
from strata.atomic import write_text
from strata.backbone.load import fingerprint, resolve, shared_backbone
from strata.config import RunConfig, check_name
from strata.coordinator import Coordinator, default_storage
from strata.data.benchmark import TASKS, write_benchmark
from strata.data.collate import Encoded, encode_table
from strata.data.schema import load_dataset, write_table
from strata.digest import file_sha256
from strata.eval.baselines import task_baselines
from strata.eval.evaluate import TaskResult
from strata.eval.metrics import summarize
from strata.eval.report import comparison_table, matrix_table, save_results, task_table
from strata.eval.scoring import SCORER_VERSION
from strata.routing import far
from strata.strategies import make_strategy
from strata.train.driver import TrainSession, init_ray

TaskCallback = Callable[[str, int, dict], None]

_VERSIONED = ("torch", "transformers", "peft", "ray", "pyarrow", "strata")


def stream_files(cfg: RunConfig, out: Path) -> dict[str, Path]:
    """Task name -> dataset path, in stream order (the built-in benchmark unless cfg.data is set)."""
    if cfg.data is None:
        return write_benchmark(out / "data", cfg.seed, TASKS[: cfg.tasks], cfg.n_train, cfg.n_val, cfg.n_test)
    root = Path(cfg.data)
    order_file = root / "stream.json"
    if order_file.exists():
        names = json.loads(order_file.read_text())["tasks"]
    else:
        names = sorted(p.stem for p in root.glob("*.parquet"))
    if len(names) < cfg.tasks:
        raise ValueError(f"{root} holds {len(names)} task(s) {names}, but tasks={cfg.tasks}")
    return {check_name(n, "task name"): root / f"{n}.parquet" for n in names[: cfg.tasks]}


def split(table: pa.Table, name: str) -> pa.Table:
    """Rows of one split."""
    return table.filter(pc.equal(table["split"], name))



def run_strategy(cfg: RunConfig, name: str, files: dict[str, Path], tables: dict[str, pa.Table],
                 train_paths: dict[str, str], tests: dict[str, Encoded], backbone_path: Path, base: list[float],
                 progress: Progress, coord: Coordinator, session: TrainSession | None,
                 on_task: TaskCallback | None = None, baselines: dict[str, dict] | None = None) -> dict:
    """Learn the whole stream with one strategy; write metrics, plot, predictions and manifest."""
    s = StrategyStream(cfg, name, backbone_path, coord, session=session)
    coord.reset(name, s.owner)  # a run starts from the frozen backbone (refused while another job trains it)
    shutil.rmtree(s.state_dir, ignore_errors=True)  # the registry keeps every earlier version
    tasks = list(files)
    T = len(tasks)
    R = np.full((T, T), np.nan)
    predictions: list[dict] = []
    training: list[dict] = []  # the loop's final metrics per task (time, trainable params, ...)
    bar = progress.add_task(f"{name}", total=T)
    for t, task in enumerate(tasks):
        # Tasks seen so far, plus the next one (FWT needs R[t][t+1]); later ones are never used.
        upcoming = {k: tests[k] for k in tasks[: t + 2]}
        so_far = tasks[: t + 1]
        results, trained = learn_task(s, task, {k: train_paths[k] for k in so_far}, upcoming,
                                      {k: split(tables[k], "val") for k in so_far})
        training.append(trained)
        for i, other in enumerate(upcoming):
            R[t, i] = results[other].accuracy
            predictions += prediction_rows(task, other, tables[other], tests[other], results[other])
        note(progress, bar, f"{name}: learned {task} ({t + 1}/{T}), acc {R[t, t]:.1f}", advance=1)
        if on_task is not None:
            on_task(name, t, summarize(R[: t + 1, : t + 1], [len(tests[k]) for k in tasks[: t + 1]], base[: t + 1]))

    sizes = [len(tests[t]) for t in tasks]
    timeline = coord.timeline(name)
    extra = {"test_sizes": sizes, "base_accuracy": base, "scorer_version": SCORER_VERSION, "training": training,
             "baselines": baselines or {},
             **summarize(R, sizes, base),
             "gate": {"mode": cfg.gate.mode,
                      "failed": [e["task"] for e in timeline if not e.get("gate", {}).get("passed", True)],
                      "rejected": [e["task"] for e in timeline if e["status"] == "rejected"]}}
    if not s.strategy.shared:
        routed = [r for r in predictions if r["after_task"] == tasks[-1]]
        extra["router_accuracy"] = 100.0 * sum(r["adapter"] == r["task"] for r in routed) / len(routed)
    metrics = save_results(s.out, name, R, tasks, extra)
    write_table(pa.Table.from_pylist(predictions), s.out / "predictions.parquet")
    write_text(s.out / "manifest.json", json.dumps(manifest(cfg, files, backbone_path, name), indent=2))
    return metrics


def prediction_rows(after: str, task: str, table: pa.Table, enc: Encoded, res: TaskResult) -> list[dict]:
    """Per-sample predictions of one evaluation, for predictions.parquet."""
    ids = split(table, "test")["id"].to_pylist()
    return [
        {"after_task": after, "task": task, "id": rid, "prediction": pred, "answer": ref,
         "score": sc, "adapter": a, "scorer": res.scorer, "router_distance": d,
         "low_confidence": far(d)}
        for rid, pred, ref, sc, a, d in zip(ids, res.predictions, enc.answers, res.scores, res.adapters,
                                            res.router_distances)
    ]


def note(progress: Progress, bar, text: str, every: bool = True, **update) -> None:
    """Update a progress bar; without a terminal (CI, Ray job logs) also log a line."""
    progress.update(bar, description=text, **update)
    if every and not progress.console.is_terminal:
        progress.console.log(text)


def manifest(cfg: RunConfig, files: dict[str, Path], backbone_path: Path, strategy: str) -> dict:
    """What reproduces this run: package versions, config and its hash, seed, data hashes."""
    return {
        "strategy": strategy,
        "config": dataclasses.asdict(cfg),
        "config_hash": cfg.hash(),
        "seed": cfg.seed,
        "python": py_platform.python_version(),
        "versions": {p: metadata.version(p) for p in _VERSIONED},
        "backbone": {"source": cfg.backbone.source, "path": str(backbone_path),
                     "fingerprint": fingerprint(backbone_path)},
        "data": {task: file_sha256(path) for task, path in files.items()},
    }


def coordinator(cfg: RunConfig) -> Coordinator:
    """The stream's coordinator: the detached Ray actor with the Ray executor, else in-process."""
    return Coordinator(cfg.stream, default_storage(cfg.out, cfg.storage), use_ray=cfg.train.executor == "ray")


def run(cfg: RunConfig, console: Console | None = None, on_task: TaskCallback | None = None) -> dict[str, dict]:
    """Run every strategy of `cfg` on the stream; print the matrices and the comparison.

    `on_task(strategy, t, metrics)` is called after each task with the metrics of tasks 0..t (Tune).
    """
    console = console or Console()
    out = Path(cfg.out).resolve()
    check_kind(cfg.adapter)  # a kind/placement pair outside the published table fails before any work
    for name in cfg.strategies:  # so does a strategy that refuses its options or the adapter kind
        make_strategy(name, cfg)
    # Validate every dataset before anything else: a bad one stops the run with nothing written.
    files = stream_files(cfg, out)
    tables = {task: load_dataset(path) for task, path in files.items()}
    train_paths = {}
    for task, table in tables.items():  # written once, shared by every strategy
        train_paths[task] = str(write_table(split(table, "train"), out / "data" / f"{task}.train.parquet"))
    with Progress(console=console, transient=False) as progress:
        pre = progress.add_task("backbone", total=None)
        backbone_path = resolve(cfg.backbone, lambda s, loss: note(
            progress, pre, f"pretraining backbone: step {s}, loss {loss:.3f}", every=(s % 250 == 0)))
        note(progress, pre, f"backbone ready: {backbone_path}", total=1, completed=1)
        if cfg.train.executor == "ray":
            init_ray()
        # One Ray Train run for every strategy's tasks; its workers start while the driver evaluates.
        with training_session(cfg) as session:
            # Tiny models generate fastest on one thread (measured: 0.6 s vs 1.6 s per 500 rows).
            torch.set_num_threads(1)
            model, processor = shared_backbone(cfg.backbone, backbone_path)
            check(cfg.adapter, model)  # per module: BitFit needs biases, every layer_ranks key must match
            tests = {t: encode_table(processor, split(tab, "test"), with_answers=False) for t, tab in tables.items()}
            zero_shot = evaluate_all(model, processor, None, None, tests, cfg.eval_batch_size)
            base = [zero_shot[t].accuracy for t in files]
            coord = coordinator(cfg)
            baselines = {t: task_baselines(tab) for t, tab in tables.items()}
            results = {s: run_strategy(cfg, s, files, tables, train_paths, tests, backbone_path, base, progress,
                                       coord, session, on_task, baselines)
                       for s in cfg.strategies}
    for name, m in results.items():
        console.print(matrix_table(m["accuracy_matrix"], m["tasks"], f"{name}: R[t][i] (%)"))
    console.print(task_table(results, baselines))
    console.print(comparison_table(results))
    write_text(out / "summary.json", json.dumps(results, indent=2))
    console.print(f"results in {out}")
    return results
