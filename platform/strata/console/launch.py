"""Launching arrivals and Tune sweeps from the console as Ray jobs, after checking everything a job
would otherwise fail on: names, the dataset (under a data root, and valid), the strategy, the sweep file.

A refused launch submits nothing. A job runs `python -m jobs.arrive` or `python -m jobs.tune` in the
repository, as `ray job submit` from a terminal would, so it shows in the Ray dashboard too.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from strata import strategies
from strata.config import check_name
from strata.console.config import ConsoleConfig

TAG = "strata-console"  # job metadata key: the jobs this console lists


@dataclass(frozen=True)
class Launch:
    """A checked job: its entrypoint and the metadata the job list shows."""

    kind: str  # "arrival" or "sweep"
    args: tuple[str, ...]  # `python -m jobs.<kind> ...` arguments
    metadata: dict[str, str]


def arrival(cfg: ConsoleConfig, out: str, stream: str, task: str, dataset: str, strategy: str,
            steps: str = "", gate: str = "enforce") -> Launch:
    """A new task for a stream: every field checked, the dataset validated, before any job exists."""
    from strata.data.schema import DatasetError, load_dataset

    check_name(out, "run directory")
    check_name(stream, "stream name")
    check_name(task, "task name")
    known = strategies.names()
    if strategy not in known:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(known)}")
    if gate not in ("enforce", "report"):
        raise ValueError(f"gate must be enforce or report, got {gate!r}")
    path = cfg.within_data_roots(dataset)
    try:
        load_dataset(path)
    except DatasetError as e:
        raise ValueError(f"dataset {dataset!r} is invalid: {e.report.format()}") from e
    args = ["--task", task, "--dataset", str(path), "--strategy", strategy, "--stream", stream,
            "--out", str((cfg.runs / out).resolve()), "--gate", gate]
    if steps.strip():
        if not steps.strip().isdigit() or int(steps) < 1:
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        args += ["--steps", str(int(steps))]
    args += ["--backbone", cfg.backbone] if cfg.backbone else []
    args += ["--executor", cfg.executor] if cfg.executor else []
    return Launch("arrive", tuple(args), {TAG: "arrival", "stream": f"{out}/{stream}", "task": task,
                                          "strategy": strategy})


def sweep(cfg: ConsoleConfig, space: str, out: str, options: dict[str, str] | None = None) -> Launch:
    """A Tune sweep from one of the console's sweep files with some of its options replaced (`strata.tune.OPTIONS`),
    parsed and checked before it is submitted."""
    from strata.tune import load_sweep, option_flags, with_options

    check_name(space.removesuffix(".yaml"), "sweep file")
    path = cfg.tune_spaces / space
    if path.suffix != ".yaml" or not path.is_file():
        raise ValueError(f"no sweep file {space!r} in {cfg.tune_spaces}")
    check_name(out, "run directory")
    parsed = with_options(load_sweep(path), options or {})  # a ValueError names the bad key or option
    where = (cfg.runs / out).resolve()
    return Launch("tune", (str(path.resolve()), "--out", str(where), *option_flags(options or {})),
                  {TAG: "sweep", "sweep": parsed.name, "out": str(where / parsed.name)})


def read_trials(where: Path) -> dict:
    """A sweep's trials (status, config, last report) while it runs, and best.yaml once it ended."""
    import yaml

    from strata.trial_states import read_states

    best = where / "best.yaml"
    return {**(read_states(where) or {"tasks": None, "trials": []}),
            "best": yaml.safe_load(best.read_text()) if best.is_file() else None}


def sweep_files(cfg: ConsoleConfig) -> list[str]:
    """The sweep files a user may pick."""
    return sorted(p.name for p in cfg.tune_spaces.glob("*.yaml"))


def job_link(cfg: ConsoleConfig, job_id: str) -> str:
    """A job's page in the Ray dashboard."""
    return f"{cfg.ray_dashboard.rstrip('/')}/#/jobs/{job_id}"


def entrypoint(cfg: ConsoleConfig, launch: Launch) -> str:
    """The shell command the Ray job runs: this Python, in the repository, with the job module."""
    command = [sys.executable, "-m", f"jobs.{launch.kind}", *launch.args]
    return f"cd {shlex.quote(str(cfg.repo.resolve()))} && " + " ".join(shlex.quote(c) for c in command)


class Jobs:
    """The console's jobs on the configured Ray cluster, through the job submission API."""

    def __init__(self, cfg: ConsoleConfig) -> None:
        from ray.job_submission import JobSubmissionClient

        self.cfg = cfg
        self.client = JobSubmissionClient(cfg.ray_dashboard)

    def submit(self, launch: Launch) -> str:
        """Submit a checked launch; its submission id."""
        repo = self.cfg.repo.resolve()
        env = {"PYTHONPATH": f"{repo / 'platform'}:{repo}"}  # nodes without the install import the repository
        return self.client.submit_job(entrypoint=entrypoint(self.cfg, launch), metadata=launch.metadata,
                                      runtime_env={"env_vars": env})

    def list(self) -> list:
        """This console's jobs, newest first."""
        jobs = [j for j in self.client.list_jobs() if (j.metadata or {}).get(TAG)]
        return sorted(jobs, key=lambda j: j.start_time or 0, reverse=True)

    def get(self, job_id: str):
        """One job's details (a RuntimeError from Ray names an unknown id)."""
        return self.client.get_job_info(check_name(job_id, "job id"))

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(check_name(job_id, "job id"))

    def stop(self, job_id: str) -> bool:
        return self.client.stop_job(check_name(job_id, "job id"))
