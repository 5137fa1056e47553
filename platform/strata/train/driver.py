"""Ray Train wiring: one TorchTrainer per run (a session), its tasks handed over one at a time;
N CPU or GPU workers, fault-tolerant, resumable."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from strata import quiet
from strata.atomic import replace_dir, write_file
from strata.backbone.load import load_backbone
from strata.config import BackboneSpec, TrainConfig
from strata.data.schema import read_table
from strata.hooks import Strategy, TaskContext
from strata.train.checkpoint import ADAPTER, STATE
from strata.train.loop import train_task

# Ray Train's defaults poll slowly; these cut a short fit's fixed cost from ~22 s to ~9 s. The
# print patch would log every worker print twice.
_TRAIN_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Join the cluster in RAY_ADDRESS if set (a Ray job), else start a local one.

    Unless verbose, every worker process of the job silences library noise at start (strata.quiet).
    """
    for key, value in _TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    kwargs["runtime_env"] = quiet.runtime_env(kwargs.get("runtime_env"))
    kwargs.setdefault("logging_level", quiet.ray_logging_level())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, **kwargs)


@dataclass(frozen=True)
class TaskJob:
    """Everything a worker needs to train one task; travels to the workers by pickle."""

    strategy: Strategy
    ctx: TaskContext
    rows_path: str  # Parquet of the rows to train on (already mixed by the strategy)
    train: TrainConfig
    backbone: BackboneSpec
    backbone_path: str
    val_path: str | None = None  # Parquet of the task's own val rows, for early stopping


@ray.remote(num_cpus=0)
class JobBoard:
    """The jobs of one training session in arrival order, and each finished job's result.

    Workers take the first unfinished job, so a worker group that Ray Train restarts after a
    failure picks up the job it was training."""

    def __init__(self) -> None:
        self.jobs: list[list[ray.ObjectRef]] = []  # a ref in a list stays a ref: the board never unpickles a job
        self.results: dict[int, tuple[dict, dict[str, bytes]]] = {}
        self.closed = False

    def submit(self, job: list[ray.ObjectRef]) -> int:
        self.jobs.append(job)
        return len(self.jobs) - 1

    def take(self, first: int) -> tuple[int, list[ray.ObjectRef]] | str | None:
        """The first unfinished job at index >= `first`; "closed" when none will come; None: wait."""
        for index in range(first, len(self.jobs)):
            if index not in self.results:
                return index, self.jobs[index]
        return "closed" if self.closed else None

    def finish(self, index: int, metrics: dict, files: dict[str, bytes]) -> None:
        self.results[index] = (metrics, files)

    def result(self, index: int) -> tuple[dict, dict[str, bytes]] | None:
        return self.results.get(index)

    def close(self) -> None:
        self.closed = True


JOB_MARKER = "job.json"  # in every checkpoint: which of the session's jobs it belongs to


def _worker(config: dict) -> None:
    """Ray Train entry point: train the session's jobs one after another on this worker group.

    After a restart (FailureConfig), the job that was training resumes from its last checkpoint."""
    board = config["board"]
    torch.set_num_threads(config["threads"])
    quiet_per_step_reports()
    device = ray.train.torch.get_device()
    latest = ray.train.get_checkpoint()  # set when FailureConfig restarted the worker group
    first = 0
    while (taken := _take(board, first)) is not None:
        index, job = taken
        resume = latest if latest is not None and _job_index(latest) == index else None
        latest = None
        metrics, files = _train_one(job, index, device, resume)
        if ray.train.get_context().get_world_rank() == 0:
            ray.get(board.finish.remote(index, metrics, files))
        first = index + 1


def _take(board, first: int) -> tuple[int, TaskJob] | None:
    """Wait for the next job (None once the session is closed)."""
    while (taken := ray.get(board.take.remote(first))) is None:
        time.sleep(0.05)
    return None if taken == "closed" else (taken[0], ray.get(taken[1][0]))


def _job_index(checkpoint: Checkpoint) -> int | None:
    """The session job a checkpoint belongs to."""
    with checkpoint.as_directory() as ckpt:
        marker = Path(ckpt) / JOB_MARKER
        return json.loads(marker.read_text())["index"] if marker.exists() else None


def _train_one(job: TaskJob, index: int, device: torch.device, resume: Checkpoint | None) -> tuple[dict, dict]:
    """Load the frozen backbone, run the loop for one job; returns its final metrics and adapter/state files."""
    backbone, processor = load_backbone(job.backbone, Path(job.backbone_path), device=device)
    final: dict = {}
    files: dict[str, bytes] = {}

    def report(metrics: dict, ckpt: Path | None) -> None:
        if ckpt is not None:
            (ckpt / JOB_MARKER).write_text(json.dumps({"index": index, "task": job.ctx.name}))
            if (ckpt / ADAPTER).is_dir():  # the final report: what the driver installs
                final.update(metrics)
                files.update({str(f.relative_to(ckpt)): f.read_bytes() for f in sorted(ckpt.rglob("*"))
                              if f.is_file() and f.parts[len(ckpt.parts)] in (ADAPTER, STATE)})
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    data = {"rows": read_table(job.rows_path), "task_rows": read_table(job.ctx.train_paths[job.ctx.name]),
            "val_rows": read_table(job.val_path) if job.val_path else None}
    if resume is None:
        train_task(backbone, processor, job.strategy, job.ctx, cfg=job.train, report=report, device=device, **data)
    else:
        with resume.as_directory() as ckpt:
            train_task(backbone, processor, job.strategy, job.ctx, cfg=job.train, report=report,
                       resume=Path(ckpt), device=device, **data)
    return final, files


def quiet_per_step_reports() -> None:
    """Ray Train logs every report at INFO on every worker; with frequent reports that drowns the
    loop's own progress lines, so its context logger (named by file path) is raised to WARNING."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def scaling(cfg: TrainConfig) -> ScalingConfig:
    """Workers, CPUs/GPUs and custom resources per worker; CPUs default to an even split of the cluster."""
    cpus = cfg.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.num_workers)
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {}),
                                               **cfg.resources_per_worker})


class TrainSession:
    """One Ray Train run that trains many tasks, one after another, on one worker group.

    Starting a run costs about 9 s on a 2-core box (controller, worker actors, process group) plus
    the workers' imports; a session pays it once per run instead of once per task. The driver
    hands each task over with `fit` and gets its adapter back; gating happens between tasks while
    the workers wait. `storage_path` is a local directory or any pyarrow.fs URI; only adapter and
    strategy state is checkpointed there. A worker that dies is replaced up to `max_failures` times,
    and the new group resumes the task it was training from that task's last checkpoint.
    """

    def __init__(self, train: TrainConfig, storage_path: str, run_name: str) -> None:
        scale = scaling(train)
        self.train, self.run_name = train, run_name
        self.board = JobBoard.remote()
        self.trainer = TorchTrainer(
            _worker,
            train_loop_config={"board": self.board, "threads": int(scale.resources_per_worker["CPU"])},
            scaling_config=scale,
            run_config=RunConfig(
                name=run_name,
                storage_path=storage_path,
                failure_config=FailureConfig(max_failures=train.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=quiet.train_logging(),  # Train's INFO lines on the console only with --verbose
            ),
            torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
        )
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"train-{run_name}")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.outcome["result"] = self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 (raised by the next fit() or close())
            self.outcome["error"] = e

    def _failure(self) -> BaseException | None:
        result = self.outcome.get("result")
        return self.outcome.get("error") or (result.error if result is not None else None)

    def fit(self, job: TaskJob) -> dict:
        """Train one task on the session's workers and install its adapter; returns its final metrics."""
        if job.train != self.train:
            raise ValueError(f"task {job.ctx.name!r}: a session trains every task with the config it started with")
        index = ray.get(self.board.submit.remote([ray.put(job)]))
        while (done := ray.get(self.board.result.remote(index))) is None:
            if not self.thread.is_alive():
                raise RuntimeError(f"training {job.ctx.name!r} with {job.strategy.name!r} failed") from self._failure()
            time.sleep(0.1)
        metrics, files = done
        if not any(name.startswith(f"{ADAPTER}/") for name in files):
            raise RuntimeError(f"training {job.ctx.name!r} ended without its final adapter checkpoint")
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            install_outputs(Path(tmp), job)
        return metrics

    def close(self) -> None:
        """Let the workers finish and end the Ray Train run."""
        self.board.close.remote()
        self.thread.join()
        ray.kill(self.board)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fit_task(job: TaskJob, storage_path: str, run_name: str) -> dict:
    """Train one task in its own Ray Train run and install its adapter (a session of one task)."""
    with TrainSession(job.train, storage_path, run_name) as session:
        return session.fit(job)


def fit_local(job: TaskJob) -> dict:
    """Train one task in this process with the same loop and install its adapter (no Ray).

    For quick single-machine runs and Tune trials: it skips Ray Train's fixed cost of several
    seconds per task; everything else (loop, strategy hooks, checkpoint, install) is the Ray path's.
    """
    backbone, processor = load_backbone(job.backbone, Path(job.backbone_path))
    final: dict = {}

    def report(metrics: dict, ckpt: Path | None) -> None:
        if ckpt is not None and (ckpt / ADAPTER).is_dir():
            install_outputs(ckpt, job)
            final.update(metrics)

    train_task(backbone, processor, job.strategy, job.ctx, read_table(job.rows_path), job.train, report,
               task_rows=read_table(job.ctx.train_paths[job.ctx.name]),
               val_rows=read_table(job.val_path) if job.val_path else None)
    return final


def install_outputs(ckpt: Path, job: TaskJob) -> None:
    """Put a final checkpoint's adapter and the strategy's per-task state files into the state dir."""
    install(ckpt / ADAPTER, job.ctx.adapters_dir / job.strategy.adapter_name(job.ctx))
    state = ckpt / STATE
    for path in sorted(state.rglob("*")) if state.is_dir() else []:
        if path.is_file():
            write_file(Path(job.ctx.state_dir) / path.relative_to(state), lambda tmp, src=path: shutil.copyfile(src, tmp))


def install(src: Path, dest: Path) -> None:
    """Copy a finished adapter directory into place atomically (copy aside, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.incoming")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dest)
