"""Continual-learning quality of every strategy on the built-in stream, plus the DGG, MoDE and CMA papers' ablations.

    .venv/bin/python benchmarks/continual_quality.py                      # every suite, 3 seeds
    .venv/bin/python benchmarks/continual_quality.py --suite dgg --seeds 0 1
    .venv/bin/python benchmarks/continual_quality.py --smoke-test         # plumbing only, ~2 min
    .venv/bin/python benchmarks/continual_quality.py --no-run             # tables of the runs done so far

Suites (each row is one strategy configuration; every run goes through `strata.pipeline.run`):
  main      every strategy on the first --main-tasks tasks of the stream (default all 8)
  dgg       DGG full / no Bernoulli / no scaling / g-hat only, replay only, and an alpha sweep; 4 tasks
  cma       CMA with and without expert freezing; 4 tasks
  mode      MoDE, MoDE without KD, the coupled MoE-LoRA, and SeqLoRA on the LM only (MoDE's placement); 4 tasks
  ewc       EWC's lambda swept over four decades; 4 tasks
  conflict  MoDE vs the modality-coupled MoE-LoRA: cosine of grad L_text and grad L_image

Training uses the run defaults (`train.steps` is a cap; early stopping on the task's val rows)
unless --steps is given. Resumable: each (configuration, seed) runs in its own Python process (so
its peak RSS is its own), writes <results>/runs/<suite>/<label>/seed<k>.json, and is skipped when
that file holds a run of the same configuration on the same backbone build (a row from an older
recipe or other options is run again; delete a row to rerun it after a code change). Training
runs in that process (`train.executor=local`: the same loop, without Ray Train's fixed cost per
task). Extra memory is a run's peak RSS minus SeqLoRA's on the same seed and stream length. The summary goes to <results>/continual_quality.json, a
plot next to it, and a markdown table between the markers in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import torch
from rich.console import Console
from rich.table import Table

from strata.atomic import write_text
from strata.backbone.load import load_backbone, resolve
from strata.config import AdapterSpec, BackboneSpec, GateConfig, RunConfig, TrainConfig
from strata.data import pretraining
from strata.data.benchmark import TASKS
from strata.data.collate import encode_table
from strata.generation import generate
from strata.hooks import TaskContext
from strata.pipeline import run as run_pipeline
from strata.strategies import make_strategy, options_for

ROOT = Path(__file__).resolve().parents[1]
MAIN = ("seqlora", "replay", "ewc", "lwf", "dgg", "mode", "cma", "decoupled", "multitask")
METRICS = ("faa", "mft", "maa", "bwt", "forgetting")
BEGIN, END = "<!-- continual_quality:begin -->", "<!-- continual_quality:end -->"
CONFLICT_STEPS = 20  # training steps before the gradient-conflict probe measures
CAPTION_ROWS = 100  # held-out pretraining captions scored after each task (the mode suite)


def suites(main_tasks: int) -> dict[str, list[tuple[str, int, dict]]]:
    """suite -> [(label, tasks, RunConfig overrides)]; labels are directory names.

    An override's `options` maps a strategy to the option values it changes from the base config's.
    """
    dgg = {
        "dgg-full": {},
        "dgg-no-bernoulli": {"bernoulli": False},
        "dgg-no-scaling": {"scaling": False},
        "dgg-ghat-only": {"replay": False},
        "dgg-alpha-0.05": {"alpha": 0.05},
        "dgg-alpha-0.5": {"alpha": 0.5},
    }
    return {
        "main": [(s, main_tasks, {"strategies": (s,)}) for s in MAIN],
        "dgg": [(label, 4, {"strategies": ("dgg",), "options": {"dgg": opts}}) for label, opts in dgg.items()]
        + [("replay-only", 4, {"strategies": ("replay",)})],
        "cma": [("cma-freeze", 4, {"strategies": ("cma",), "options": {"cma": {}}}),
                ("cma-no-freeze", 4, {"strategies": ("cma",), "options": {"cma": {"freeze": False}}})],
        # Each also scores held-out pretraining captions after every task: what MoDE's KD protects.
        "mode": [(label, 4, {**o, "captions": True}) for label, o in (
            ("mode", {"strategies": ("mode",)}),
            ("mode-no-kd", {"strategies": ("mode",), "options": {"mode": {"kd_weight": 0.0}}}),
            ("moe-lora-coupled", {"strategies": ("mode",), "options": {"mode": {"coupled": True}}}),
            ("seqlora", {"strategies": ("seqlora",)}),
            ("seqlora-lm-only", {"strategies": ("seqlora",), "adapter": AdapterSpec(visual_rank=0)}))],
        "ewc": [(f"ewc-{weight:g}", 4, {"strategies": ("ewc",), "options": {"ewc": {"weight": weight}}})
                for weight in (1e2, 1e3, 1e4, 1e5)],
    }


def with_overrides(base: RunConfig, overrides: dict, **fields) -> RunConfig:
    """`base` with a suite entry's overrides: plain fields replaced, strategy options changed field by field."""
    changes = overrides.get("options", {})
    options = {**base.options, **{name: replace(options_for(base, name), **values) for name, values in changes.items()}}
    plain = {k: v for k, v in overrides.items() if k not in ("options", "captions")}
    return replace(base, options=options, **plain, **fields)


# Ablation rows whose configuration is exactly a main-suite strategy at its defaults: with the same
# stream length and seed, the run is the same (it is deterministic), so its result is copied, not rerun.
SAME_AS_MAIN = {"dgg-full": "dgg", "replay-only": "replay"}


def copy_of_main(results: Path, label: str, tasks: int, seed: int) -> dict | None:
    """The main suite's row for the same configuration, relabelled, or None if there is none yet."""
    source = results / "runs" / "main" / SAME_AS_MAIN.get(label, "-") / f"seed{seed}.json"
    if not source.exists():
        return None
    row = json.loads(source.read_text())
    return {**row, "label": label, "copied_from": f"main/{row['label']}"} if len(row["tasks"]) == tasks else None


def current(path: Path, wanted: dict[str, str]) -> bool:
    """Whether `path` holds a finished run of exactly this configuration on this backbone build."""
    if not path.exists():
        return False
    row = json.loads(path.read_text())
    return all(row.get(k) == v for k, v in wanted.items())


def state_kb(state: Path) -> float:
    """KiB of what a strategy keeps beyond its adapters: replay rows, Fisher, memory, router, masks.

    Left out: the adapters themselves and rows.parquet, the pipeline's hand-off of the current
    task's training table (every strategy has one)."""
    if not state.exists():
        return 0.0
    skip = state / "adapters"
    files = [p for p in state.rglob("*") if p.is_file() and skip not in p.parents and p.name != "rows.parquet"]
    return sum(p.stat().st_size for p in files) / 1024


def dir_kb(path: Path) -> float:
    """Size of every file under `path` in KiB (0 when absent)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024 if path.exists() else 0.0


def run_config(base: RunConfig, overrides: dict, tasks: int, seed: int, out: Path) -> RunConfig:
    """The run config of one (configuration, seed)."""
    return with_overrides(base, overrides, tasks=tasks, seed=seed, out=str(out), train=replace(base.train, seed=seed))


def identity(cfg: RunConfig) -> dict[str, str]:
    """What makes a stored row reusable: the config and the backbone build. Where a run writes and
    how often it reports to Ray do not change what it learns, so they are left out (pinned)."""
    learning = replace(cfg, out="-", train=replace(cfg.train, report_every=1))
    return {"config_key": learning.hash(), "backbone_build": resolve(cfg.backbone).name}


def dgg_steps(state: Path) -> dict[str, dict]:
    """DGG's per-step figures, summarised per task: mean ‖θ−θ*‖ and ‖∇L‖, steps injected and rescaled."""
    out = {}
    for path in sorted((state / "dgg_steps").glob("*.json")):
        t = json.loads(path.read_text())
        out[path.stem] = {"steps": len(t["step"]), "injected": sum(t["injected"]), "scaled": sum(t["scaled"]),
                          "d_norm_mean": statistics.fmean(t["d_norm"]), "d_norm_last": t["d_norm"][-1],
                          "grad_norm_mean": statistics.fmean(t["grad_norm"])}
    return out


def caption_rows(rows: int) -> pa.Table:
    """Held-out rows of the pretraining mixture's caption kind (a seed stream the corpus never used)."""
    rng = random.Random("held-out captions")
    drawn = [pretraining.KINDS["caption"](rng, 48) for _ in range(rows)]
    return pa.table({"image": [r[0] for r in drawn], "prompt": [r[1] for r in drawn], "answer": [r[2] for r in drawn]})


def caption_score(cfg: RunConfig, name: str, state: Path, task_index: int | None, rows: pa.Table) -> float:
    """Exact-match % of greedy captions with the adapter as it stands after task `task_index` (None: the bare backbone)."""
    model, processor = load_backbone(cfg.backbone)
    if task_index is not None:
        tasks = TASKS[: cfg.tasks]
        ctx = TaskContext(task_index, tasks[task_index], tuple(tasks[:task_index]), {}, str(state), cfg.seed)
        model = make_strategy(name, cfg).load_eval(model, ctx)
    said = generate(model, processor, encode_table(processor, rows, with_answers=False), 40)
    return 100.0 * sum(g.text == a for g, a in zip(said, rows["answer"].to_pylist())) / len(rows)


def run_one(base: RunConfig, label: str, tasks: int, overrides: dict, seed: int, work: Path) -> dict:
    """One strategy configuration on one seed, from scratch: the pipeline's metrics plus cost columns."""
    out = work / f"{label}-seed{seed}"
    # A run stopped halfway leaves its registry and task leases behind; rows resume whole, never mid-run.
    shutil.rmtree(out, ignore_errors=True)
    cfg = run_config(base, overrides, tasks, seed, out)
    (name,) = cfg.strategies
    captions: list[float] = []
    on_task = None
    if overrides.get("captions"):
        rows = caption_rows(CAPTION_ROWS)
        captions.append(caption_score(cfg, name, out / name / "state", None, rows))
        def on_task(_: str, t: int, __: dict) -> None:
            captions.append(caption_score(cfg, name, out / name / "state", t, rows))
    started = time.time()
    results = run_pipeline(cfg, Console(quiet=True), on_task=on_task)
    wall = time.time() - started
    m = results[name]
    state = out / name / "state"
    return {
        "label": label, "strategy": name, "seed": seed, "tasks": m["tasks"],
        **{k: m[k] for k in (*METRICS, "mfn", "accuracy_matrix")},
        "router_accuracy": m.get("router_accuracy"),
        "trainable_params": m["training"][-1].get("trainable_params"),
        "train_seconds": sum(t.get("train_seconds", 0.0) for t in m["training"]),
        "wall_seconds": wall,
        "adapter_kb": dir_kb(state / "adapters"),
        "extra_state_kb": state_kb(state),
        **identity(cfg),
        "baselines": m.get("baselines", {}),
        "stopped_at": [t.get("step") for t in m["training"]],
        **({"dgg_steps": dgg_steps(state)} if name == "dgg" else {}),
        **({"captions": captions} if captions else {}),  # before any task, then after each
        # Linux reports ru_maxrss in KiB; this process ran nothing but this one configuration.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def baseline(raw: dict, strategy: str, key: str) -> dict[tuple[int, int], float]:
    """(stream length, seed) -> `key` of the main suite's run of `strategy`."""
    return {(len(r["tasks"]), r["seed"]): r[key] for r in raw.get("main", {}).get(strategy, []) if r.get(key)}


def paired(rows: list[dict], key: str, base: dict[tuple[int, int], float]) -> tuple[float | None, float]:
    """Mean and std of row[key] − base on the same (stream length, seed); (None, 0) when no pair exists."""
    diffs = [r[key] - base[(len(r["tasks"]), r["seed"])] for r in rows
             if r.get(key) is not None and (len(r["tasks"]), r["seed"]) in base]
    return (statistics.fmean(diffs) if diffs else None), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def aggregate(rows: list[dict], raw: dict) -> dict:
    """Mean and standard deviation over seeds, the FAA gap to MultiTask and the RSS over SeqLoRA (paired)."""
    agg: dict = {"seeds": sorted(r["seed"] for r in rows), "strategy": rows[0]["strategy"],
                 "tasks": len(rows[0]["tasks"])}
    for key in (*METRICS, "trainable_params", "train_seconds", "wall_seconds", "adapter_kb", "extra_state_kb",
                "peak_rss_mb"):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        agg[key] = statistics.fmean(values) if values else None
        agg[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    agg["gap_to_multitask"], agg["gap_to_multitask_std"] = paired(rows, "faa", baseline(raw, "multitask", "faa"))
    agg["extra_rss_mb"], agg["extra_rss_mb_std"] = paired(rows, "peak_rss_mb", baseline(raw, "seqlora", "peak_rss_mb"))
    return agg


def fmt(agg: dict, key: str, digits: int = 1) -> str:
    """mean ± std, or a dash."""
    if agg.get(key) is None:
        return "—"
    std = agg.get(f"{key}_std") or 0.0
    return f"{agg[key]:.{digits}f} ± {std:.{digits}f}" if len(agg["seeds"]) > 1 else f"{agg[key]:.{digits}f}"


COLUMNS = [("FAA", "faa"), ("MFT", "mft"), ("MAA", "maa"), ("BWT", "bwt"), ("F", "forgetting"),
           ("gap to MT", "gap_to_multitask")]


def num(value: float | None, pattern: str) -> str:
    """`value` formatted, or a dash when it is missing."""
    return "—" if value is None else format(value, pattern)


def table_rows(summary: dict) -> list[list[str]]:
    """One row per (suite, configuration) with the quality and cost columns."""
    rows = []
    for suite, configs in summary.items():
        for label, agg in configs.items():
            cost = [num(agg.get("trainable_params"), ",.0f"), num(agg.get("extra_state_kb"), ".0f"),
                    num(agg.get("extra_rss_mb"), "+.0f"), num(agg.get("wall_seconds"), ".0f")]
            rows.append([suite, label, str(agg["tasks"]), str(len(agg["seeds"])),
                         *(fmt(agg, k) for _, k in COLUMNS), *cost])
    return rows


HEADERS = ["suite", "configuration", "tasks", "seeds", *(h for h, _ in COLUMNS), "trainable params",
           "state on disk KB", "peak RSS vs SeqLoRA MB", "wall s"]


def per_task(raw: dict) -> list[list[str]]:
    """Main suite, one row per task: both baselines, the accuracy learned alone (Decoupled's diagonal)
    and each strategy's accuracy at the end of the stream, means over seeds."""
    main = raw.get("main", {})
    if not main:
        return []
    tasks = max((r["tasks"] for rows in main.values() for r in rows), key=len)
    full = {s: [r for r in rows if r["tasks"] == tasks] for s, rows in main.items()}
    full = {s: rows for s, rows in full.items() if rows}
    def mean(values: list[float]) -> str:
        return f"{statistics.fmean(values):.1f}" if values else "—"
    any_rows = [r for rows in full.values() for r in rows]
    out = []
    for i, task in enumerate(tasks):
        base = [r["baselines"][task] for r in any_rows if task in r.get("baselines", {})]
        alone = [r["accuracy_matrix"][i][i] for r in full.get("decoupled", [])]
        out.append([task, mean([b["constant"] for b in base if b["constant"] is not None]),
                    mean([b["pixels"] for b in base if b["pixels"] is not None]), mean(alone),
                    *(mean([r["accuracy_matrix"][-1][i] for r in rows]) for rows in full.values())])
    return [["task", "constant answer", "pixels (logistic regression)", "learned alone (Decoupled diagonal)",
             *(f"{s} at the end" for s in full)], *out]


def caption_table(raw: dict) -> list[list[str]]:
    """Mode suite: held-out caption exact match before any task and after each, beside FAA (means over seeds)."""
    runs = {label: rows for label, rows in raw.get("mode", {}).items() if all("captions" in r for r in rows)}
    if not runs:
        return []
    width = max(len(r["captions"]) for rows in runs.values() for r in rows)
    out = [["configuration", "backbone alone", *(f"after task {t}" for t in range(1, width)), "FAA"]]
    for label, rows in runs.items():
        cells = [statistics.fmean(r["captions"][i] for r in rows if len(r["captions"]) > i) for i in range(width)]
        out.append([label, *(f"{c:.1f}" for c in cells), f"{statistics.fmean(r['faa'] for r in rows):.1f}"])
    return out


def md_table(rows: list[list[str]]) -> list[str]:
    """Markdown lines of a table whose first row is the header."""
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0]), *("| " + " | ".join(r) + " |" for r in rows[1:])]


def markdown(summary: dict, raw: dict, command: str, conflict: list[str], hours: float) -> str:
    """The BENCHMARKS.md block: the command, the quality table, the per-task table and the conflict table."""
    lines = [BEGIN, f"Command: `{command}` ({hours:.1f} h of compute over the runs in the table)", "",
             "| " + " | ".join(HEADERS) + " |",
             "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
    if rows := per_task(raw):
        lines += ["", "Per task, main suite (mean over seeds):", "", *md_table(rows)]
    if rows := caption_table(raw):
        title = f"Held-out pretraining captions, exact match % on {CAPTION_ROWS} rows (mode suite, mean over seeds):"
        lines += ["", title, "", *md_table(rows)]
    return "\n".join([*lines, *conflict, END])


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
    import matplotlib.pyplot as plt

    from strata.eval.plots import save_figure  # selects the headless backend

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
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    plt.close(fig)


def run_conflict(base: RunConfig, seeds: list[int], results: Path, steps: int, console: Console,
                 no_run: bool = False) -> dict:
    """The gradient-conflict probe for MoDE and the coupled MoE-LoRA, per seed (resumable per backbone build)."""
    from strata.data.benchmark import generate_task
    from strata.eval.conflict import probe

    build = resolve(base.backbone).name
    reports = {}
    for seed in seeds:
        path = results / "runs" / "conflict" / f"seed{seed}.json"
        current_row = path.exists() and json.loads(path.read_text()).get("backbone_build") == build
        if not current_row and no_run:
            console.log(f"conflict probe seed {seed}: not run yet on {build}, left out")
            continue
        if not current_row:
            table = generate_task("colour", seed, n_train=64, n_val=0, n_test=0)
            report = probe(base.backbone, resolve(base.backbone), table, options_for(base, "mode"), steps=steps, seed=seed)
            write_text(path, json.dumps({**report, "backbone_build": build}, indent=2, default=float))
        reports[seed] = json.loads(path.read_text())
        console.log(f"conflict probe seed {seed}: done")
    return reports


def mean_conflict(reports: dict) -> dict:
    """The probe reports averaged over seeds, field by field, in the shape `conflict_table` reads."""
    first = next(iter(reports.values()))
    out = {"setup": {**first["setup"], "seeds": sorted(reports)}}
    for kind in ("mode", "coupled"):
        groups = {}
        for group, fields in first[kind]["groups"].items():
            groups[group] = {k: (statistics.fmean(r[kind]["groups"][group][k] for r in reports.values())
                                 if isinstance(v, (int, float)) else v) for k, v in fields.items()}
        out[kind] = {"kind": kind, "groups": groups}
    return out


def conflict_markdown(mean: dict) -> list[str]:
    """Markdown rows of the seed-averaged probe: one per kind and parameter group."""
    lines = ["", f"Gradient conflict (MoDE vs coupled MoE-LoRA), mean over seeds {mean['setup']['seeds']}, "
             f"after {mean['setup']['steps']} training steps, on {mean['setup']['rows']} rows:", "",
             "| kind | group | tensors with both | cos mean | cos min | cos max | share < 0 | "
             "‖∇L_text‖ | ‖∇L_image‖ | other/own ratio |", "|" + "---|" * 10]
    for kind in ("mode", "coupled"):
        for group, g in mean[kind]["groups"].items():
            lines.append(f"| {kind} | {group} | {g['both']:.0f}/{g['params']:.0f} | {g['cos_mean']:.3f} | "
                         f"{g['cos_min']:.3f} | {g['cos_max']:.3f} | {g['frac_negative']:.2f} | "
                         f"{g['norm_text']:.3g} | {g['norm_image']:.3g} | {g['cross_ratio']:.3g} |")
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", choices=("main", "dgg", "cma", "mode", "ewc", "conflict"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--main-tasks", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="a fixed step count (default: the run's cap and early stop)")
    p.add_argument("--test-rows", type=int, default=500)
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "continual_quality")
    p.add_argument("--benchmarks-md", type=Path, default=ROOT / "BENCHMARKS.md")
    p.add_argument("--smoke-test", action="store_true", help="test backbone, 2 tasks, 4 steps: plumbing only")
    p.add_argument("--no-run", action="store_true", help="only summarise the runs already done (a partial table)")
    p.add_argument("--one", nargs=3, metavar=("SUITE", "LABEL", "SEED"), help=argparse.SUPPRESS)  # a child run
    return p.parse_args(argv)


def setup(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    """The base run config and the plan of suites for these arguments."""
    backbone = BackboneSpec("builtin:test" if args.smoke_test else "builtin:tiny")
    steps, test_rows = (4, 16) if args.smoke_test else (args.steps, args.test_rows)
    # A fixed step count trains every task that long; by default the cap and early stop of a run apply.
    train = TrainConfig(executor="local") if steps is None else TrainConfig(steps=steps, val_every=0, executor="local")
    # Report mode: the benchmark measures each strategy's raw forgetting, so no candidate is held back.
    base = RunConfig(strategies=("seqlora",), backbone=backbone, n_test=test_rows, gate=GateConfig(mode="report"),
                     train=train)
    if args.smoke_test:
        small = {"replay": {"per_task": 8}, "dgg": {"per_task": 8}, "cma": {"memory": 8, "memory_batch": 4},
                 "mode": {"reference_rows": 16, "kd_batch": 4}}
        base = replace(base, n_train=64, n_val=8,
                       options={name: replace(options_for(base, name), **values) for name, values in small.items()})
    plan = suites(2 if args.smoke_test else args.main_tasks)
    if args.smoke_test:
        plan = {s: [(label, 2, o) for label, _, o in configs] for s, configs in plan.items()}
    return base, plan


def run_child(args: argparse.Namespace, base: RunConfig, plan: dict) -> None:
    """`--one SUITE LABEL SEED`: run one configuration in this fresh process and write its JSON."""
    suite, label, seed = args.one[0], args.one[1], int(args.one[2])
    (tasks, overrides), = [(t, o) for lab, t, o in plan[suite] if lab == label]
    row = run_one(base, label, tasks, overrides, seed, args.results / "work" / suite)
    write_text(args.results / "runs" / suite / label / f"seed{seed}.json", json.dumps(row, indent=2))


def main(argv: list[str] | None = None) -> None:
    """Run the selected suites (resumably, one process per run), then print and save the summary."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    base, plan = setup(args)
    if args.one:
        return run_child(args, base, plan)
    console = Console()
    chosen = args.suite or ["main", "dgg", "cma", "mode", "ewc", "conflict"]
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/continual_quality.py", *argv])

    raw: dict[str, dict[str, list[dict]]] = {}
    for suite in [s for s in chosen if s in plan]:
        for label, tasks, overrides in plan[suite]:
            for seed in args.seeds:
                path = args.results / "runs" / suite / label / f"seed{seed}.json"
                wanted = identity(run_config(base, overrides, tasks, seed, Path("-")))
                if not current(path, wanted) and (row := copy_of_main(args.results, label, tasks, seed)) is not None:
                    write_text(path, json.dumps(row, indent=2))
                if not current(path, wanted) and args.no_run:
                    console.log(f"{suite}/{label} seed {seed}: not run yet, left out")
                    continue
                if not current(path, wanted):
                    console.log(f"{suite}/{label} seed {seed}: {tasks} tasks …")
                    child = [sys.executable, __file__, *argv, "--one", suite, label, str(seed)]
                    if subprocess.run(child).returncode != 0:
                        raise SystemExit(f"{suite}/{label} seed {seed} failed; finished runs are kept, rerun to resume")
                    row = json.loads(path.read_text())
                    console.log(f"{suite}/{label} seed {seed}: FAA {row['faa']:.1f}, F {row['forgetting']:.1f}, "
                                f"{row['wall_seconds']:.0f} s, peak RSS {row['peak_rss_mb']:.0f} MB")
                raw.setdefault(suite, {}).setdefault(label, []).append(json.loads(path.read_text()))

    summary = {suite: {label: aggregate(rows, raw) for label, rows in configs.items()}
               for suite, configs in raw.items()}
    table = Table(title="continual quality (mean ± std over seeds)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in ("suite", "configuration") else "right")
    for row in table_rows(summary):
        table.add_row(*row)
    console.print(table)
    for title, rows in (("per task, main suite (mean over seeds)", per_task(raw)),
                        ("held-out caption exact match %, mode suite", caption_table(raw))):
        if rows:
            extra = Table(title=title)
            for h in rows[0]:
                extra.add_column(h, justify="right")
            for row in rows[1:]:
                extra.add_row(*row)
            console.print(extra)

    conflict, lines = {}, []
    if "conflict" in chosen:
        from strata.eval.conflict import conflict_table

        conflict = run_conflict(base, args.seeds, args.results, 1 if args.smoke_test else CONFLICT_STEPS, console,
                                args.no_run)
        if conflict:
            mean = mean_conflict(conflict)
            console.print(conflict_table(mean))
            lines = conflict_markdown(mean)
    compute = sum(r["wall_seconds"] for configs in raw.values() for rows in configs.values() for r in rows
                  if "copied_from" not in r)
    console.print(f"compute: {compute / 3600:.2f} h of runs in the table (each run's own wall clock)")
    report = {"command": command, "compute_hours": compute / 3600, "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "config": {"backbone": base.backbone.source, "steps": base.train.steps, "test_rows": base.n_test,
                         "seeds": args.seeds},
              "summary": summary, "runs": raw, "conflict": conflict}
    write_text(args.results / "continual_quality.json", json.dumps(report, indent=2))
    if summary:
        plot(summary, args.results / "continual_quality.png")
    if not args.smoke_test and (summary or lines):
        update_benchmarks_md(args.benchmarks_md, markdown(summary, raw, command, lines, compute / 3600))
    console.print(f"results in {args.results}")


if __name__ == "__main__":
    main()
