"""Ray Tune sweeps: each trial learns a whole continual stream and reports the metrics after every task.

A sweep is one YAML file (see tune_spaces/): a base run config, a search space over dotted
run-config keys (adapter.text_rank, cma.experts, dgg.alpha, train.lr, replay_per_task, ...), the
scheduler, the metric and the resources per trial. Reporting after each task lets ASHA stop a
configuration that is already behind after its first tasks. Trials train in their own process
(executor "local"), so a trial holds exactly the resources Tune gave it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from strata import strategies
from strata.config import RunConfig, check_name, from_dict
from strata.eval.metrics import METRIC_KEYS

DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")  # PBT needs a trial to resume a stream mid-way from a checkpoint: not yet


@dataclass(frozen=True)
class SweepConfig:
    """One sweep, as written in a tune_spaces/ YAML file."""

    name: str
    space: dict[str, Any]  # dotted run-config key -> {grid|choice|uniform|loguniform|randint: ...} or a constant
    base: dict[str, Any] = field(default_factory=dict)  # the run config every trial starts from
    metric: str = "faa"
    mode: str = "max"
    num_samples: int = 1  # samples of the random domains (each grid point is run this many times)
    scheduler: str = "asha"
    grace_period: int = 1  # ASHA: tasks every trial learns before it can be stopped
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent_trials: int | None = None
    out: str = "runs/tune"

    def __post_init__(self) -> None:
        check_name(self.name, "sweep name")
        if self.metric not in METRIC_KEYS:
            raise ValueError(f"sweep metric must be one of {METRIC_KEYS}, got {self.metric!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"sweep mode must be 'max' or 'min', got {self.mode!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"sweep scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.grace_period < 1 or self.reduction_factor < 2 or self.num_samples < 1:
            raise ValueError("sweep grace_period and num_samples must be >= 1, reduction_factor >= 2")
        if (self.max_concurrent_trials is not None and self.max_concurrent_trials < 1) \
                or min(self.cpus_per_trial, self.gpus_per_trial) < 0:
            raise ValueError("sweep max_concurrent_trials must be >= 1, cpus_per_trial and gpus_per_trial >= 0")
        for key, domain in self.space.items():
            if isinstance(domain, dict) and (len(domain) != 1 or next(iter(domain)) not in DOMAINS):
                raise ValueError(f"space.{key} must be a constant or one of {{{'|'.join(DOMAINS)}: ...}}, "
                                 f"got {domain!r}")
        # Every corner of the space must make a valid run config: fail here, not in trial 3.
        for key, domain in self.space.items():
            for value in corners(domain):
                run_config(self, {key: value}, "/tmp/strata-sweep-check")

    @property
    def tasks(self) -> int:
        """Tasks per trial (the scheduler's max_t)."""
        return run_config(self, {}, "/tmp/strata-sweep-check").tasks


def corners(domain: Any) -> list[Any]:
    """Representative values of a domain, for validating the space up front."""
    if not isinstance(domain, dict):
        return [domain]
    kind, values = next(iter(domain.items()))
    return list(values) if kind in ("grid", "choice") else [values[0], values[1]]


def load_sweep(path: Path) -> SweepConfig:
    """Read and validate a sweep YAML."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return from_dict(SweepConfig, raw, f"sweep {path}")


# The sweep options a launch may override: `strata tune` flags, and the console's sweep form.
OPTIONS = {"num_samples": int, "scheduler": str, "max_concurrent_trials": int, "cpus_per_trial": float,
           "gpus_per_trial": float}


def with_options(sweep: SweepConfig, options: dict[str, Any]) -> SweepConfig:
    """The sweep with some options replaced (None or "" keeps the file's); a ValueError names a bad one."""
    values = {}
    for key, value in options.items():
        if key not in OPTIONS:
            raise ValueError(f"unknown sweep option {key!r}; known: {', '.join(OPTIONS)}")
        if value is None or value == "":
            continue
        try:
            values[key] = OPTIONS[key](value)
        except ValueError:
            raise ValueError(f"sweep option {key} must be a {OPTIONS[key].__name__}, got {value!r}") from None
    return dataclasses.replace(sweep, **values)  # validated again, as a file would be


def option_flags(options: dict[str, Any]) -> list[str]:
    """The `strata tune` flags that set these options (None and "" left out)."""
    return [arg for key, value in options.items() if value not in (None, "")
            for arg in (f"--{key.replace('_', '-')}", str(value))]


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """raw['a']['b'] = value for key 'a.b' (lists stay lists: from_dict makes them tuples)."""
    *parents, leaf = key.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[leaf] = value


def run_config(sweep: SweepConfig, params: dict[str, Any], out: str) -> RunConfig:
    """The trial's run config: the base, the sampled params on top, in-process training under `out`."""
    raw = copy.deepcopy(sweep.base)
    for key, value in params.items():
        set_dotted(raw, key, value)
    raw["out"] = out
    raw.setdefault("train", {})["executor"] = "local"
    return strategies.run_config(raw, f"sweep {sweep.name} trial config")


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    """The Tune search space (dotted keys kept flat, so results read like the YAML)."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    space = {}
    for key, domain in sweep.space.items():
        if isinstance(domain, dict):
            kind, values = next(iter(domain.items()))
            space[key] = make[kind](values)
        else:
            space[key] = domain
    return space


def trial(params: dict[str, Any], sweep: SweepConfig) -> None:
    """One Tune trial: learn the stream, reporting the metrics of tasks 1..t after each task t."""
    from ray import tune

    from strata.pipeline import run

    ctx = tune.get_context()
    cfg = run_config(sweep, params, str(Path(ctx.get_trial_dir()) / "run"))
    cfg = RunConfig(**{**cfg.__dict__, "stream": f"trial-{ctx.get_trial_id()}"})

    def on_task(strategy: str, t: int, metrics: dict) -> None:
        tune.report({"tasks": t + 1, "strategy": strategy,
                     **{k: v for k, v in metrics.items() if v is not None}})

    run(cfg, Console(quiet=True), on_task)


def mlflow_callbacks(name: str) -> list:
    """Tune's MLflow logger (one MLflow run per trial, with its config and every report) when
    $MLFLOW_TRACKING_URI is set; each trial's stream also logs its own run (`strata.tracking`)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=f"strata-sweep-{name}", save_artifact=False)]


def sweep_run(sweep: SweepConfig, console: Console | None = None):
    """Run the sweep on the current Ray cluster; print a table, write the best run config; return the ResultGrid."""
    from functools import partial

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from strata.train.driver import init_ray
    from strata.trial_states import TrialStates

    console = console or Console()
    init_ray()
    cfg = run_config(sweep, {}, sweep.out)
    if len(cfg.strategies) != 1:
        raise ValueError(f"a sweep tunes one strategy; base.strategies is {list(cfg.strategies)}")
    scheduler = (ASHAScheduler(time_attr="tasks", max_t=cfg.tasks, grace_period=sweep.grace_period,
                               reduction_factor=sweep.reduction_factor)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    resources = {"cpu": sweep.cpus_per_trial, "gpu": sweep.gpus_per_trial}
    tuner = tune.Tuner(
        tune.with_resources(partial(trial, sweep=sweep), resources),
        param_space=param_space(sweep),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                                    num_samples=sweep.num_samples,
                                    max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(Path(sweep.out).resolve()),
                                  callbacks=[TrialStates(Path(sweep.out).resolve() / sweep.name, cfg.tasks),
                                             *mlflow_callbacks(sweep.name)]),
    )
    grid = tuner.fit()
    summarize_sweep(sweep, grid, cfg.tasks, console)
    return grid


def summarize_sweep(sweep: SweepConfig, grid, tasks: int, console: Console) -> dict:
    """Print one row per trial, and write summary.json, a plot and best.yaml (a `strata run` config)."""
    from strata.atomic import write_text
    from strata.eval.plots import plot_sweep

    rows = []
    for result in grid:
        m = result.metrics or {}
        params = {k: v for k, v in (result.config or {}).items()}
        rows.append({"trial": Path(result.path).name, "params": params, "tasks_done": m.get("tasks", 0),
                     sweep.metric: m.get(sweep.metric), "stopped_early": m.get("tasks", 0) < tasks,
                     "error": str(result.error).splitlines()[0] if result.error else None,
                     "history": result.metrics_dataframe[sweep.metric].tolist()
                     if result.metrics_dataframe is not None and sweep.metric in result.metrics_dataframe else []})
    table = Table(title=f"sweep {sweep.name}: {sweep.metric} ({sweep.mode}) after each trial's last task")
    for col in ("trial", *sweep.space, "tasks", sweep.metric, "stopped early"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["trial"][:24], *(json.dumps(r["params"].get(k)) for k in sweep.space), str(r["tasks_done"]),
                      "—" if r[sweep.metric] is None else f"{r[sweep.metric]:.1f}", "yes" if r["stopped_early"] else "")
    console.print(table)
    out = Path(sweep.out).resolve() / sweep.name
    summary = {"sweep": sweep.name, "metric": sweep.metric, "mode": sweep.mode, "trials": rows}
    errors = [r for r in rows if r["error"]]
    if len(errors) < len(rows):
        best = grid.get_best_result(metric=sweep.metric, mode=sweep.mode, scope="last")
        base = run_config(sweep, best.config, str(out / "best-run"))
        raw = json.loads(json.dumps(dataclasses.asdict(base)))  # tuples become YAML lists
        raw.update(raw.pop("options"))  # each strategy's options as its own section, as users write them
        raw["train"]["executor"] = "ray"
        write_text(out / "best.yaml", yaml.safe_dump(raw, sort_keys=False))
        summary["best"] = {"params": best.config, sweep.metric: best.metrics.get(sweep.metric)}
        console.print(f"best: {json.dumps(best.config)} → {sweep.metric} {best.metrics.get(sweep.metric):.1f}; "
                      f"run it with `strata run --config {out / 'best.yaml'}`")
    write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    plot_sweep(rows, sweep.metric, out / "sweep.png")
    return summary
