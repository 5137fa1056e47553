"""Continual-learning quality of every strategy on the built-in stream, plus the seed papers' ablations.

    .venv/bin/python benchmarks/continual_quality.py                      # every suite, 3 seeds
    .venv/bin/python benchmarks/continual_quality.py --suite dgg --seeds 0 1
    .venv/bin/python benchmarks/continual_quality.py --smoke-test         # plumbing only, ~2 min

Suites (each row is one strategy configuration; every run goes through `strata.pipeline.run`):
  main      every strategy on the first --main-tasks tasks of the stream (default 4)
  dgg       DGG full / no Bernoulli / no scaling / g-hat only, replay only, and an alpha sweep; 4 tasks
  cma       CMA with and without expert freezing; 4 tasks
  conflict  MoDE vs the modality-coupled MoE-LoRA: cosine of grad L_text and grad L_image

Resumable: each (configuration, seed) writes <results>/runs/<suite>/<label>/seed<k>.json and is
skipped when that file exists. Training runs in-process (`train.executor=local`: the same loop,
without Ray Train's fixed cost per task). The summary goes to <results>/continual_quality.json, a
plot next to it, and a markdown table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from strata.atomic import write_text
from strata.config import BackboneSpec, CMAConfig, DGGConfig, RunConfig, TrainConfig
from strata.pipeline import run as run_pipeline

ROOT = Path(__file__).resolve().parents[1]
MAIN = ("seqlora", "replay", "ewc", "lwf", "dgg", "mode", "cma", "decoupled", "multitask")
METRICS = ("faa", "mfn", "maa", "bwt", "forgetting")
BEGIN, END = "<!-- continual_quality:begin -->", "<!-- continual_quality:end -->"


def suites(main_tasks: int) -> dict[str, list[tuple[str, int, dict]]]:
    """suite -> [(label, tasks, RunConfig overrides)]; labels are directory names."""
    dgg = {
        "dgg-full": DGGConfig(),
        "dgg-no-bernoulli": DGGConfig(bernoulli=False),
        "dgg-no-scaling": DGGConfig(scaling=False),
        "dgg-ghat-only": DGGConfig(replay=False),
        "dgg-alpha-0.05": DGGConfig(alpha=0.05),
        "dgg-alpha-0.5": DGGConfig(alpha=0.5),
    }
    return {
        "main": [(s, main_tasks, {"strategies": (s,)}) for s in MAIN],
        "dgg": [(label, 4, {"strategies": ("dgg",), "dgg": opts}) for label, opts in dgg.items()]
        + [("replay-only", 4, {"strategies": ("replay",)})],
        "cma": [("cma-freeze", 4, {"strategies": ("cma",), "cma": CMAConfig()}),
                ("cma-no-freeze", 4, {"strategies": ("cma",), "cma": CMAConfig(freeze=False)})],
    }


def dir_kb(path: Path) -> float:
    """Size of every file under `path` in KiB (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024 if path.exists() else 0.0


def run_one(base: RunConfig, label: str, tasks: int, overrides: dict, seed: int, work: Path) -> dict:
    """One strategy configuration on one seed: the pipeline's metrics plus cost columns."""
    out = work / f"{label}-seed{seed}"
    cfg = replace(base, tasks=tasks, seed=seed, out=str(out), train=replace(base.train, seed=seed), **overrides)
    started = time.time()
    results = run_pipeline(cfg, Console(quiet=True))
    wall = time.time() - started
    (name,) = cfg.strategies
    m = results[name]
    state = out / name / "state"
    return {
        "label": label, "strategy": name, "seed": seed, "tasks": m["tasks"],
        **{k: m[k] for k in (*METRICS, "mft", "accuracy_matrix")},
        "router_accuracy": m.get("router_accuracy"),
        "trainable_params": m["training"][-1].get("trainable_params"),
        "train_seconds": sum(t.get("train_seconds", 0.0) for t in m["training"]),
        "wall_seconds": wall,
        "adapter_kb": dir_kb(state / "adapters"),
        "extra_state_kb": dir_kb(state) - dir_kb(state / "adapters"),
        "config_hash": cfg.hash(),
    }


def aggregate(rows: list[dict], multitask_faa: dict[int, float]) -> dict:
    """Mean and standard deviation over seeds, plus the FAA gap to MultiTask on the same seeds."""
    agg: dict = {"seeds": sorted(r["seed"] for r in rows), "strategy": rows[0]["strategy"]}
    for key in (*METRICS, "trainable_params", "train_seconds", "wall_seconds", "adapter_kb", "extra_state_kb"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        agg[key] = statistics.fmean(values) if values else None
        agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    gaps = [r["faa"] - multitask_faa[r["seed"]] for r in rows if r["seed"] in multitask_faa]
    agg["gap_to_multitask"] = statistics.fmean(gaps) if gaps else None
    return agg


def fmt(agg: dict, key: str, digits: int = 1) -> str:
    """mean ± std, or a dash."""
    if agg.get(key) is None:
        return "—"
    std = agg.get(f"{key}_std") or 0.0
    return f"{agg[key]:.{digits}f} ± {std:.{digits}f}" if len(agg["seeds"]) > 1 else f"{agg[key]:.{digits}f}"


COLUMNS = [("FAA", "faa"), ("MFN", "mfn"), ("MAA", "maa"), ("BWT", "bwt"), ("F", "forgetting"),
           ("gap to MT", "gap_to_multitask")]


def table_rows(summary: dict) -> list[list[str]]:
    """One row per (suite, configuration) with the quality and cost columns."""
    rows = []
    for suite, configs in summary.items():
        for label, agg in configs.items():
            cost = [f"{agg['trainable_params']:,.0f}" if agg.get("trainable_params") else "—",
                    f"{agg['extra_state_kb']:.0f}" if agg.get("extra_state_kb") is not None else "—",
                    f"{agg['wall_seconds']:.0f}" if agg.get("wall_seconds") else "—"]
            rows.append([suite, label, str(len(agg["seeds"])), *(fmt(agg, k) for _, k in COLUMNS), *cost])
    return rows


HEADERS = ["suite", "configuration", "seeds", *(h for h, _ in COLUMNS), "trainable params", "extra state KB",
           "wall s"]


def markdown(summary: dict, command: str) -> str:
    """The BENCHMARKS.md block: the command and one table."""
    lines = [BEGIN, f"Command: `{command}`", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
    return "\n".join([*lines, END])


def update_benchmarks_md(path: Path, block: str) -> None:
    """Replace the marked block in BENCHMARKS.md (or append it)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(path, text)


def plot(summary: dict, path: Path) -> None:
    """FAA and forgetting per configuration, one panel per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, (suite, configs) in zip(axes[0], summary.items()):
        labels = list(configs)
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], [configs[k]["faa"] for k in labels], 0.4, label="FAA",
               yerr=[configs[k]["faa_std"] for k in labels])
        ax.bar([i + 0.2 for i in x], [configs[k]["forgetting"] for k in labels], 0.4, label="F",
               yerr=[configs[k]["forgetting_std"] for k in labels])
        ax.set_xticks(list(x), labels, rotation=45, ha="right")
        ax.set_title(suite)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_conflict(base: RunConfig, seeds: list[int], results: Path, console: Console) -> dict:
    """The gradient-conflict probe for MoDE and the coupled MoE-LoRA, per seed (resumable)."""
    from strata.backbone.load import resolve
    from strata.data.benchmark import generate_task
    from strata.eval.conflict import probe

    reports = {}
    for seed in seeds:
        path = results / "runs" / "conflict" / f"seed{seed}.json"
        if not path.exists():
            table = generate_task("colour", seed, n_train=64, n_val=0, n_test=0)
            report = probe(base.backbone, resolve(base.backbone), table, base.mode, steps=20, seed=seed)
            write_text(path, json.dumps(report, indent=2, default=float))
        reports[seed] = json.loads(path.read_text())
        console.log(f"conflict probe seed {seed}: done")
    return reports


def main(argv: list[str] | None = None) -> None:
    """Run the selected suites (resumably), then print and save the summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=("main", "dgg", "cma", "conflict"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--main-tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "continual_quality")
    p.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--smoke-test", action="store_true", help="test backbone, 2 tasks, 4 steps: plumbing only")
    args = p.parse_args(argv)
    console = Console()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    backbone = BackboneSpec("builtin:test" if args.smoke_test else "builtin:tiny")
    steps, test_rows = (4, 16) if args.smoke_test else (args.steps, args.test_rows)
    base = RunConfig(strategies=("seqlora",), backbone=backbone, n_test=test_rows,
                     train=TrainConfig(steps=steps, executor="local"))
    if args.smoke_test:
        base = replace(base, n_train=64, n_val=8, replay_per_task=8,
                       cma=CMAConfig(memory=8, memory_batch=4), mode=replace(base.mode, reference_rows=16, kd_batch=4))
    plan = suites(2 if args.smoke_test else args.main_tasks)
    if args.smoke_test:
        plan = {s: [(label, 2, o) for label, _, o in configs] for s, configs in plan.items()}
    chosen = args.suite or ["main", "dgg", "cma", "conflict"]
    work = args.results / "work"
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/continual_quality.py", *(argv or sys.argv[1:])])

    raw: dict[str, dict[str, list[dict]]] = {}
    for suite in [s for s in chosen if s in plan]:
        for label, tasks, overrides in plan[suite]:
            for seed in args.seeds:
                path = args.results / "runs" / suite / label / f"seed{seed}.json"
                if not path.exists():
                    console.log(f"{suite}/{label} seed {seed}: {tasks} tasks …")
                    row = run_one(base, label, tasks, overrides, seed, work)
                    write_text(path, json.dumps(row, indent=2))
                    console.log(f"{suite}/{label} seed {seed}: FAA {row['faa']:.1f}, F {row['forgetting']:.1f}, "
                                f"{row['wall_seconds']:.0f} s")
                raw.setdefault(suite, {}).setdefault(label, []).append(json.loads(path.read_text()))

    multitask = {r["seed"]: r["faa"] for r in raw.get("main", {}).get("multitask", [])}
    summary = {suite: {label: aggregate(rows, multitask if suite == "main" else {}) for label, rows in configs.items()}
               for suite, configs in raw.items()}
    conflict = run_conflict(base, args.seeds, args.results, console) if "conflict" in chosen else {}

    table = Table(title="continual quality (mean ± std over seeds)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("suite", "configuration") else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console.print(table)
    report = {"command": command, "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "config": {"backbone": backbone.source, "steps": steps, "test_rows": test_rows, "seeds": args.seeds},
              "summary": summary, "runs": raw, "conflict": conflict}
    write_text(args.results / "continual_quality.json", json.dumps(report, indent=2))
    if summary:
        plot(summary, args.results / "continual_quality.png")
        if not args.smoke_test:
            update_benchmarks_md(args.benchmarks_md, markdown(summary, command))
    console.print(f"results in {args.results}")


if __name__ == "__main__":
    main()
