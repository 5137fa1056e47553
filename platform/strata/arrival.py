"""The life of one arriving task for one strategy (docs/ARCHITECTURE.md), shared by `strata run` and the jobs.

begin (coordinator) → train (Ray Train or in-process) → strategy bookkeeping → push the candidate
to the registry → gate on `val` against the state served before → promote, or reject and restore
the served state → commit in the coordinator. There is no other path to production.

The driver reads the backbone from disk once per process (`shared_backbone`): the candidate and
the served state it is compared with are two adapter sets over the same frozen weights.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import pyarrow as pa

from strata.atomic import replace_dir
from strata.backbone.load import shared_backbone
from strata.config import RunConfig
from strata.coordinator import Coordinator
from strata.data.collate import Encoded, encode_table
from strata.data.schema import read_table, write_table
from strata.digest import file_sha256
from strata.eval.drift import anchor_rows, anchor_table, answer_log_probs, mean_kl
from strata.eval.evaluate import TaskResult, evaluate_task
from strata.eval.gate import Verdict, decide, kl_threshold
from strata.hooks import Strategy, TaskContext, record
from strata.registry import BackboneInfo, Ref, Registry, backbone_info
from strata.routing import Routed
from strata.strategies import make_strategy
from strata.tracking import MlflowTracker, mlflow_tracker, write_curve
from strata.train.driver import TaskJob, TrainSession, fit_local, fit_task


def job_owner() -> str:
    """Who is driving: the Ray job's submission id, or host:pid plus a random suffix."""
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class StrategyStream:
    """One strategy's stream: its state on disk, its coordinator record, its registry, who drives it."""

    cfg: RunConfig
    name: str
    backbone_path: Path
    coord: Coordinator
    owner: str = field(default_factory=job_owner)
    session: TrainSession | None = None  # a Ray Train run shared by many tasks (`training_session`)

    def __post_init__(self) -> None:
        self.strategy: Strategy = make_strategy(self.name, self.cfg)
        root = Path(self.cfg.out).resolve()
        self.out = root / self.name
        self.state_dir = self.out / "state"
        self.registry = Registry(self.cfg.registry or str(root / "registry"))

    @cached_property
    def backbone(self) -> BackboneInfo:
        """The backbone's identity and module shapes, for the registry's checks."""
        model, _ = shared_backbone(self.cfg.backbone, self.backbone_path)
        return backbone_info(self.cfg.backbone.source, self.backbone_path, model)

    @cached_property
    def tracker(self) -> MlflowTracker | None:
        """The stream's MLflow run (found or created once per job), or None without a tracking URI."""
        return mlflow_tracker(self.out, asdict(self.cfg))

    def registry_adapter(self, task: str) -> str:
        """The versioned adapter a task adds to: its own for a per-task strategy, else the strategy's."""
        return self.name if self.strategy.shared else task

    def learned(self) -> list[str]:
        """Tasks this strategy has promoted so far, in order."""
        return [e["task"] for e in self.promoted()]

    def promoted(self) -> list[dict]:
        """The coordinator's entries of promoted tasks, in order."""
        return [e for e in self.coord.timeline(self.name) if e["status"] == "promoted"]

    def context(self, task: str, train_paths: dict[str, str], state_dir: Path | None = None) -> TaskContext:
        """The TaskContext of `task` arriving after every promoted task."""
        seen = tuple(self.learned())
        return TaskContext(len(seen), task, seen, {**train_paths}, str(state_dir or self.state_dir), self.cfg.seed)

    def served_context(self, state_dir: Path | None = None) -> TaskContext | None:
        """The context of the last promoted task over `state_dir` (default: the state itself); None before any."""
        seen = self.learned()
        if not seen:
            return None
        return TaskContext(len(seen) - 1, seen[-1], tuple(seen[:-1]), {}, str(state_dir or self.state_dir),
                           self.cfg.seed)


def eval_model(cfg: RunConfig, backbone_path: Path, strategy: Strategy, ctx: TaskContext | None):
    """The backbone with the strategy's adapters after task `ctx` (None: the bare backbone), frozen."""
    model, processor = shared_backbone(cfg.backbone, backbone_path)
    return (strategy.load_eval(model, ctx) if ctx else model), processor


def evaluate_all(model, processor, strategy, ctx, tests: dict[str, Encoded], batch_size: int) -> dict[str, TaskResult]:
    """Evaluate every given task, routing each row as the strategy would at inference."""
    results = {}
    for task, enc in tests.items():
        results[task] = evaluate_task(model, processor, enc, routes(strategy, ctx, model, processor, enc, task),
                                      batch_size)
    return results


def routes(strategy, ctx, model, processor, enc: Encoded, task: str | None) -> list[Routed | None]:
    """Where each row goes (None everywhere for the bare backbone)."""
    return strategy.route(ctx, model, processor, enc, task) if ctx else [None] * len(enc)


def adapter_names(routed: list[Routed | None]) -> list[str | None]:
    """The adapter name of each routed row."""
    return [r.task if r else None for r in routed]


def learn_task(s: StrategyStream, task: str, train_paths: dict[str, str], tests: dict[str, Encoded],
               vals: dict[str, pa.Table]) -> tuple[dict[str, TaskResult], dict]:
    """Train, gate and record one task; returns the served state's evaluation on `tests` and training metrics.

    `train_paths` and `vals` map every task seen so far and `task` to its train rows and val rows.
    The coordinator refuses a task another job is training. A rejected candidate or a failure puts
    the served state back, so the next task trains from what production holds.
    """
    ctx = s.context(task, train_paths)
    entry = s.coord.begin_task(s.name, task, s.owner)
    served = keep_copy(s.state_dir, s.out / ".served")
    try:
        trained = train(s, ctx, entry["run_id"], vals[task])
        s.strategy.after_task(ctx, read_table(train_paths[task]))
        model, processor = eval_model(s.cfg, s.backbone_path, s.strategy, ctx)
        ref = push_candidate(s, ctx, trained)
        served_ctx = s.served_context(served)
        anchor, _ = eval_model(s.cfg, s.backbone_path, s.strategy, served_ctx)
        verdict, val = gate(s, ctx, (model, anchor), processor, served_ctx, vals)
        results = evaluate_all(model, processor, s.strategy, ctx, tests, s.cfg.eval_batch_size)
        accuracy = {t: r.accuracy for t, r in results.items()}
        s.coord.set_status(s.name, task, s.owner, "evaluated", accuracy=accuracy, val_accuracy=val,
                           gate=verdict.record(), candidate=str(ref))
        if s.tracker:
            s.tracker.log_task(ctx.index, accuracy, verdict.record())
        metrics = {"training": trained, "val_accuracy": val, "test_accuracy": accuracy}
        if verdict.passed or s.cfg.gate.mode == "report":
            promote(s, ctx, ref, verdict, metrics)
        else:
            s.registry.set_stage(ref, "rejected", "failed the gate", reasons=verdict.reasons, gate=verdict.record(),
                                 metrics=metrics)
            # Before the move: served_ctx points into `served` (Decoupled's router is read from there).
            results = evaluate_all(anchor, processor, s.strategy, served_ctx, tests, s.cfg.eval_batch_size)
            replace_dir(served, s.state_dir)
            s.coord.commit_task(s.name, task, s.owner, "rejected",
                                {"reasons": verdict.reasons, "accuracy": {t: r.accuracy for t, r in results.items()}})
    except BaseException as e:
        if served.exists():
            replace_dir(served, s.state_dir)
        s.coord.set_status(s.name, task, s.owner, "failed", reasons=[f"{type(e).__name__}: {e}"])
        raise
    finally:
        shutil.rmtree(served, ignore_errors=True)
    return results, trained


@contextmanager
def training_session(cfg: RunConfig) -> Iterator[TrainSession | None]:
    """One Ray Train run for every task trained in the block (None with the local executor)."""
    if cfg.train.executor != "ray":
        yield None
        return
    with TrainSession(cfg.train, checkpoint_storage(cfg), f"{cfg.stream}-{uuid.uuid4().hex[:8]}") as session:
        yield session


def checkpoint_storage(cfg: RunConfig) -> str:
    """Where Ray Train keeps a run's checkpoints: `train.storage_path`, else `<out>/ray`."""
    return cfg.train.storage_path or str(Path(cfg.out).resolve() / "ray")


def keep_copy(state_dir: Path, dest: Path) -> Path:
    """Copy the served state aside before a task changes it (an empty directory when there is none)."""
    shutil.rmtree(dest, ignore_errors=True)
    if state_dir.exists():
        # rows.parquet and val.parquet are this task's training inputs, rewritten by every task: not state.
        shutil.copytree(state_dir, dest, symlinks=True, ignore=shutil.ignore_patterns("rows.parquet", "val.parquet"))
    else:
        dest.mkdir(parents=True)
    return dest


def train(s: StrategyStream, ctx: TaskContext, run_id: str, val: pa.Table) -> dict:
    """Mix the rows and train the task on Ray Train (the run's session, or a run of its own) or in
    this process; returns the final metrics.

    `val` (the task's own val rows) drives early stopping."""
    rows_path, val_path = s.state_dir / "rows.parquet", s.state_dir / "val.parquet"
    write_table(s.strategy.training_table(ctx, read_table(ctx.train_paths[ctx.name])), rows_path)
    write_table(val, val_path)
    job = TaskJob(s.strategy, ctx, str(rows_path), s.cfg.train, s.cfg.backbone, str(s.backbone_path),
                  val_path=str(val_path))
    if s.cfg.train.executor == "local":
        trained = fit_local(job)
    elif s.session is not None:
        trained = s.session.fit(job)
    else:
        trained = fit_task(job, checkpoint_storage(s.cfg), f"{s.name}-{ctx.index:02d}-{ctx.name}-{run_id}")
    write_curve(s.out / "tensorboard", ctx.name, trained.get("curve", []))
    if s.tracker:
        s.tracker.log_curve(ctx.name, trained.get("curve", []))
    return {k: v for k, v in trained.items() if isinstance(v, (int, float, str))}


def push_candidate(s: StrategyStream, ctx: TaskContext, trained: dict) -> Ref:
    """Register the trained adapter (and the strategy's side files) as a candidate version."""
    adapter = s.registry_adapter(ctx.name)
    ref = Ref(s.cfg.stream, adapter, s.coord.next_version(adapter))
    card = {"strategy": s.name, "task": ctx.name, "tasks": [*ctx.seen, ctx.name], "kind": s.cfg.adapter.kind,
            "config_hash": s.cfg.hash(), "seed": s.cfg.seed, "parent": s.registry.production(ref.stream, adapter),
            "data": {t: file_sha256(Path(p)) for t, p in ctx.train_paths.items()},
            "metrics": {"training": trained}, "owner": s.owner}
    with tempfile.TemporaryDirectory() as tmp:
        side = s.strategy.version_files(ctx, Path(tmp))
        s.registry.push(ref, ctx.adapters_dir / s.strategy.adapter_name(ctx), card, s.backbone, side)
    return ref


def gate(s: StrategyStream, ctx: TaskContext, models: tuple, processor, served_ctx: TaskContext | None,
         vals: dict[str, pa.Table]) -> tuple[Verdict, dict[str, float]]:
    """Evaluate candidate and served state on `val` and the anchor set, and decide; returns (verdict, val acc)."""
    model, anchor = models
    cfg, bs = s.cfg.gate, s.cfg.eval_batch_size
    enc = {t: encode_table(processor, vals[t], with_answers=False) for t in [*ctx.seen, ctx.name]}
    val = {t: r.accuracy for t, r in evaluate_all(model, processor, s.strategy, ctx, enc, bs).items()}
    served_on_new = evaluate_all(anchor, processor, s.strategy, served_ctx, {ctx.name: enc[ctx.name]}, bs)
    promoted = s.promoted()
    before = promoted[-1].get("val_accuracy", {}) if ctx.seen else {}
    table = anchor_table(Path(cfg.anchor), cfg.anchor_rows) if cfg.anchor else anchor_rows(vals, list(ctx.seen), cfg.anchor_rows)
    kl = None
    if table is not None:
        rows = encode_table(processor, table, with_answers=True)
        pad = processor.tokenizer.pad_token_id
        served = adapter_names(routes(s.strategy, served_ctx, anchor, processor, rows, None))
        candidate = adapter_names(routes(s.strategy, ctx, model, processor, rows, None))
        kl = mean_kl(answer_log_probs(anchor, rows, served, pad), answer_log_probs(model, rows, candidate, pad))
    drifts = [e["gate"]["kl"] for e in promoted if e.get("gate", {}).get("kl") is not None]
    verdict = decide(cfg, ctx.name, val, {t: before[t] for t in ctx.seen if t in before},
                     served_on_new[ctx.name].accuracy, kl, kl_threshold(cfg, drifts))
    return verdict, val


def promote(s: StrategyStream, ctx: TaskContext, ref: Ref, verdict: Verdict, metrics: dict) -> None:
    """Serve the candidate and commit the task with its version and the strategy's state records."""
    reason = "passed the gate" if verdict.passed else f"gate in report mode: {'; '.join(verdict.reasons)}"
    s.registry.promote(ref, reason, gate=verdict.record(), metrics=metrics)
    records = {name: record(path, s.state_dir) for name, path in s.strategy.state_records(ctx).items()
               if path.exists()}
    s.coord.commit_task(s.name, ctx.name, s.owner, "promoted", {
        "adapter": {"name": ref.adapter, "version": ref.version, "registry": s.registry.uri},
        "records": records, "accuracy": metrics["test_accuracy"], "metrics": metrics["training"]})
