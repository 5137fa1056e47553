"""How training cost scales: per arriving task, and with the number of Ray Train workers.

    .venv/bin/python benchmarks/scale.py                 # builtin:tiny, 8 tasks (about 15 min on 2 cores)
    .venv/bin/python benchmarks/scale.py --quick         # builtin:test, 3 tasks (a smoke run)

Part 1, cost per arriving task t = 1..8 (in-process training, the Ray path's loop; no evaluation):
  decoupled   a new adapter per task, `steps` steps on the task's own rows.
  dgg         the shared adapter, `steps` steps on the task's rows plus the replay reservoir.
  multitask   retraining on the union of tasks 1..t from a fresh adapter, with the same passes over
              every row as the task's own training: steps grow as t × `steps`. This is what keeping a
              joint model current costs; the adapter strategies keep the cost of one task.
Part 2, throughput of one task on Ray Train with 1 worker (all CPUs) against 2 workers (1 CPU
each) with DDP, and with DeepSpeed ZeRO-2, at the same global batch; samples/s from the loop's own
timer (Ray's start-up excluded, reported separately as wall time). Metrics go to Ray every 10
steps; one more 1-worker row reports every step, to show what a report costs.

Writes benchmarks/results/scale.json, a plot beside it, and prints both tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.compute as pc
from rich.console import Console
from rich.table import Table

from strata.atomic import write_text
from strata.backbone.load import resolve
from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.data.benchmark import TASKS, generate_task
from strata.data.schema import read_table, write_table
from strata.eval.plots import save_figure
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.train.driver import TaskJob, fit_local, fit_task, init_ray

RESULTS = Path(__file__).resolve().parent / "results"


def task_rows(tasks: list[str], n_train: int, work: Path, seed: int) -> dict[str, str]:
    """Train rows of each built-in task, as Parquet."""
    paths = {}
    for task in tasks:
        table = generate_task(task, seed, n_train=n_train, n_val=0, n_test=0)
        paths[task] = str(write_table(table.filter(pc.equal(table["split"], "train")), work / f"{task}.parquet"))
    return paths


def learn(strategy: str, t: int, tasks: list[str], paths: dict[str, str], cfg: RunConfig, state: Path,
          backbone: Path) -> dict:
    """Train task t the way `strata run` would (rows mixed by the strategy), timing the fit."""
    s = make_strategy(strategy, cfg)
    ctx = TaskContext(t, tasks[t], tuple(tasks[:t]), {k: paths[k] for k in tasks[: t + 1]}, str(state), cfg.seed)
    train = cfg.train
    if strategy == "multitask":  # retrain from scratch on everything, same passes per row
        shutil.rmtree(ctx.adapters_dir, ignore_errors=True)
        train = dataclasses.replace(train, steps=train.steps * (t + 1))
    current = read_table(paths[tasks[t]])
    rows = s.training_table(ctx, current)
    write_table(rows, state / "rows.parquet")
    started = time.perf_counter()
    metrics = fit_local(TaskJob(s, ctx, str(state / "rows.parquet"), train, cfg.backbone, str(backbone)))
    wall = time.perf_counter() - started
    if strategy == "dgg":  # the replay reservoir grows the next task's rows (Decoupled's router is built in the fit)
        s.after_task(ctx, current)
    return {"strategy": strategy, "task": t + 1, "steps": train.steps, "rows": rows.num_rows,
            "train_seconds": metrics["train_seconds"], "wall_seconds": wall}


def per_task(cfg: RunConfig, tasks: list[str], paths: dict[str, str], backbone: Path, work: Path,
             console: Console) -> list[dict]:
    """Part 1: the time to learn each arriving task, per strategy."""
    rows = []
    for strategy in ("decoupled", "dgg", "multitask"):
        state = work / strategy
        for t in range(len(tasks)):
            row = learn(strategy, t, tasks, paths, cfg, state, backbone)
            console.log(f"{strategy}: task {t + 1} trained {row['steps']} steps on {row['rows']} rows "
                        f"in {row['train_seconds']:.1f} s")
            rows.append(row)
    return rows


def throughput(cfg: RunConfig, tasks: list[str], paths: dict[str, str], backbone: Path, work: Path,
               console: Console, zero: bool) -> list[dict]:
    """Part 2: samples/s of one task on Ray Train, 1 worker against 2 (DDP, and ZeRO-2)."""
    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)
    # Every row but the first reports metrics every 10 steps: a report costs a round trip to the
    # Train controller (~0.15 s here), which would hide the compute on a model this small.
    every = {"report_every": 10}
    variants = [("1 worker, report every step", {"num_workers": 1, "cpus_per_worker": cpus, "report_every": 1}),
                ("1 worker", {"num_workers": 1, "cpus_per_worker": cpus, **every}),
                ("2 workers, DDP", {"num_workers": 2, "cpus_per_worker": half, **every})]
    if zero:
        variants.append(("2 workers, ZeRO-2", {"num_workers": 2, "cpus_per_worker": half, "zero_stage": 2, **every}))
    init_ray(num_cpus=cpus)
    s = make_strategy("seqlora", cfg)
    out = []
    for label, scaling in variants:
        train = dataclasses.replace(cfg.train, executor="ray", checkpoint_every=0, **scaling)
        ctx = TaskContext(0, tasks[0], (), {tasks[0]: paths[tasks[0]]}, str(work / f"tp-{len(out)}"), cfg.seed)
        started = time.perf_counter()
        metrics = fit_task(TaskJob(s, ctx, paths[tasks[0]], train, cfg.backbone, str(backbone)),
                           str(work / "ray"), f"throughput-{len(out)}")
        wall = time.perf_counter() - started
        rate = train.steps * train.batch_size / metrics["train_seconds"]
        console.log(f"{label}: {rate:.1f} samples/s ({metrics['train_seconds']:.1f} s in the loop, {wall:.1f} s wall)")
        out.append({"variant": label, "samples_per_s": rate, "train_seconds": metrics["train_seconds"],
                    "wall_seconds": wall, **scaling})
    base = out[1]["samples_per_s"]
    for row in out:
        row["speedup"] = row["samples_per_s"] / base
    return out


def report(per: list[dict], tp: list[dict], console: Console) -> None:
    """Print both tables: seconds per task (and ratio to task 1), and throughput ratios."""
    table = Table(title="time to learn task t (s, training loop only; ratio to task 1)")
    table.add_column("strategy")
    tasks = sorted({r["task"] for r in per})
    for t in tasks:
        table.add_column(f"t={t}", justify="right")
    for strategy in dict.fromkeys(r["strategy"] for r in per):
        mine = {r["task"]: r["train_seconds"] for r in per if r["strategy"] == strategy}
        table.add_row(strategy, *(f"{mine[t]:.1f} ({mine[t] / mine[1]:.1f}×)" for t in tasks))
    console.print(table)
    table = Table(title="Ray Train throughput, same global batch")
    for col in ("variant", "samples/s", "vs 1 worker", "loop s", "wall s"):
        table.add_column(col)
    for r in tp:
        table.add_row(r["variant"], f"{r['samples_per_s']:.1f}", f"{r['speedup']:.2f}×",
                      f"{r['train_seconds']:.1f}", f"{r['wall_seconds']:.1f}")
    console.print(table)


def plot(per: list[dict], path: Path) -> None:
    """Seconds per arriving task, one line per strategy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in dict.fromkeys(r["strategy"] for r in per):
        mine = [r for r in per if r["strategy"] == strategy]
        ax.plot([r["task"] for r in mine], [r["train_seconds"] for r in mine], marker="o", label=strategy)
    ax.set_xlabel("arriving task t")
    ax.set_ylabel("seconds to learn task t")
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Run both parts and write the JSON, the plot and the tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="builtin:test, 3 tasks, few steps (a smoke run)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--no-zero", action="store_true", help="skip the DeepSpeed ZeRO-2 throughput row")
    p.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = p.parse_args(argv)
    backbone = BackboneSpec("builtin:test" if args.quick else "builtin:tiny")
    n_tasks, steps = (3, 6) if args.quick else (args.tasks, args.steps)
    cfg = RunConfig(strategies=("dgg",), backbone=backbone, adapter=AdapterSpec(), gate=GateConfig(mode="report"),
                    train=TrainConfig(steps=steps, batch_size=16, executor="local", checkpoint_every=0))
    console = Console()
    tasks = list(TASKS[:n_tasks])
    with tempfile.TemporaryDirectory(prefix="strata-scale-") as tmp:
        work = Path(tmp)
        paths = task_rows(tasks, 200 if args.quick else 1000, work, cfg.seed)
        path = resolve(backbone)
        per = per_task(cfg, tasks, paths, path, work, console)
        tp = throughput(cfg, tasks, paths, path, work, console, zero=not args.no_zero)
    report(per, tp, console)
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
              "command": "python benchmarks/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "backbone": backbone.source, "steps": steps, "batch_size": cfg.train.batch_size,
              "per_task": per, "throughput": tp}
    write_text(args.out, json.dumps(result, indent=2))
    plot(per, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
