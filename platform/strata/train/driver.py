"""Ray Train wiring: one TorchTrainer per task; N CPU or GPU workers, fault-tolerant, resumable."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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
    threads_per_worker: int = 1  # set by fit_task from the CPUs each worker gets


def _worker(config: dict) -> None:
    """Ray Train entry point: load the frozen backbone, resume if Train restarted us, run the loop."""
    job: TaskJob = config["job"]
    torch.set_num_threads(job.threads_per_worker)
    quiet_per_step_reports()
    device = ray.train.torch.get_device()
    backbone, processor = load_backbone(job.backbone, Path(job.backbone_path), device=device)

    def report(metrics: dict, ckpt: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    data = {"rows": read_table(job.rows_path), "task_rows": read_table(job.ctx.train_paths[job.ctx.name]),
            "val_rows": read_table(job.val_path) if job.val_path else None}
    latest = ray.train.get_checkpoint()  # set when FailureConfig restarted the worker group
    if latest is None:
        train_task(backbone, processor, job.strategy, job.ctx, cfg=job.train, report=report, device=device, **data)
        return
    with latest.as_directory() as ckpt:
        train_task(backbone, processor, job.strategy, job.ctx, cfg=job.train, report=report, resume=Path(ckpt),
                   device=device, **data)


def quiet_per_step_reports() -> None:
    """Ray Train logs every report at INFO on every worker; with a report per step that drowns the
    loop's own progress lines, so its context logger (named by file path) is raised to WARNING."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def scaling(cfg: TrainConfig) -> ScalingConfig:
    """Workers, CPUs/GPUs and custom resources per worker; CPUs default to an even split of the cluster."""
    cpus = cfg.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.num_workers)
    return ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                         resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.use_gpu else {}),
                                               **cfg.resources_per_worker})


def fit_task(job: TaskJob, storage_path: str, run_name: str) -> dict:
    """Train one task on Ray Train and install its adapter into the strategy's state dir.

    `storage_path` is a local directory or any pyarrow.fs URI; only adapter and strategy state is
    checkpointed there. A worker that dies is replaced up to `max_failures` times, and the new
    group resumes from the last checkpoint.
    """
    scale = scaling(job.train)
    job = TaskJob(**{**job.__dict__, "threads_per_worker": int(scale.resources_per_worker["CPU"])})
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job},
        scaling_config=scale,
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=job.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=quiet.train_logging(),  # Train's INFO lines on the console only with --verbose
        ),
        torch_config=TorchConfig(backend="nccl" if job.train.use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training {job.ctx.name!r} with {job.strategy.name!r} failed") from result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training {job.ctx.name!r} reported no adapter checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        if not (Path(ckpt) / ADAPTER).is_dir():
            raise RuntimeError(f"training {job.ctx.name!r} ended without its final adapter checkpoint")
        install_outputs(Path(ckpt), job)
    return dict(result.metrics or {})


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
