"""Is DGG's guidance ĝ a stand-in for the gradient of the earlier task? Measured during task 2.

    .venv/bin/python benchmarks/dgg_probe.py [--tasks colour,shape] [--steps 150] [--every 5] [--seeds 0 1 2]

DGG (Dynamic Gradient Guidance, CVPR 2026) reads forgetting as the missing gradient of the earlier
tasks and stands θ − θ* in for it. This checks that reading on the built-in backbone. Task 1 is
learned with DGG at its defaults (`fit_local`: the loop a run uses, in this process). Task 2 then
trains on its rows plus the replay reservoir, and every `--every` steps, before ĝ is added, the
probe computes on held-out task-1 rows (its test split, never trained on):
- the true task-1 gradient g₁ = ∇θ L₁ (the loss with the adapter as it stands at that step);
- cos(θ − θ*, g₁): positive when pulling back toward θ* lowers task 1's loss;
- cos(∇L_batch, g₁): how the step's own gradient (current rows + replay) agrees with task 1.
It also keeps DGG's own per-step figures (‖θ − θ*‖, ‖∇L‖, injected, scaled). Results go to
benchmarks/results/dgg_probe.json, a plot beside it, and a table in the terminal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import matplotlib
import pyarrow.compute as pc
import torch
from rich.console import Console
from rich.table import Table

from strata.atomic import write_text
from strata.backbone.load import load_backbone, resolve
from strata.config import BackboneSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.data.schema import write_table
from strata.grads import Grads
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.strategies.dgg import DGG
from strata.train.driver import TaskJob, fit_local

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 64  # task-1 test rows whose loss gives g₁


def cosine(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Cosine between two gradient-shaped lists, flattened and concatenated (None counts as zero)."""
    pairs = [(x.float().flatten(), y.float().flatten()) for x, y in zip(a, b) if x is not None and y is not None]
    dot = sum(float(x @ y) for x, y in pairs)
    na = sum(float(x.pow(2).sum()) for x in a if x is not None) ** 0.5
    nb = sum(float(y.pow(2).sum()) for y in b if y is not None) ** 0.5
    return dot / (na * nb) if na > 0 and nb > 0 else 0.0


class ProbedDGG(DGG):
    """DGG whose `after_backward` first compares θ − θ* and the step's gradient with the true task-1 gradient."""

    def __init__(self, base: DGG, held_out: dict[str, torch.Tensor], every: int) -> None:
        super().__init__(adapter=base.adapter, opts=base.opts)
        self.held_out, self.every, self.probes = held_out, every, []

    def after_backward(self, model: torch.nn.Module, grads: Grads, step: int) -> None:
        """Probe (on every `every`-th step of a task with θ*), then DGG's own step."""
        displacement = self.displacement(grads)
        if displacement is not None and step % self.every == 0:
            model.eval()  # no dropout in the probe's forward
            loss = model(**self.held_out).loss
            g1 = torch.autograd.grad(loss, grads.params, allow_unused=True)
            model.train()
            self.probes.append({"step": step, "task1_loss": loss.item(),
                                "cos_displacement": cosine(displacement, list(g1)),
                                "cos_batch_gradient": cosine(grads.values(), list(g1))})
        super().after_backward(model, grads, step)


def run_seed(backbone: str, tasks: tuple[str, str], steps: int, every: int, seed: int) -> dict:
    """Task 1 with DGG, then task 2 with the probe; returns the probes and DGG's per-step trace."""
    spec = BackboneSpec(source=backbone)
    tables = {t: generate_task(t, seed, n_train=1000, n_val=0, n_test=200) for t in tasks}
    train = {t: tab.filter(pc.equal(tab["split"], "train")) for t, tab in tables.items()}
    strategy = make_strategy("dgg", RunConfig(strategies=("dgg",)))
    cfg = TrainConfig(steps=steps, val_every=0, checkpoint_every=0, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {t: str(Path(tmp) / f"{t}.parquet") for t in tasks}
        for t in tasks:
            write_table(train[t], Path(paths[t]))
        state = str(Path(tmp) / "state")
        first = TaskContext(0, tasks[0], (), paths, state, seed)
        fit_local(TaskJob(strategy, first, paths[tasks[0]], cfg, spec, str(resolve(spec))))
        strategy.after_task(first, train[tasks[0]])  # the driver's step: keep task 1's replay rows

        _, processor = load_backbone(spec)
        test1 = tables[tasks[0]].filter(pc.equal(tables[tasks[0]]["split"], "test")).slice(0, HELD_OUT)
        held_out = collate(encode_table(processor, test1, with_answers=True), processor.tokenizer.pad_token_id)
        probed = ProbedDGG(strategy, held_out, every)
        second = TaskContext(1, tasks[1], (tasks[0],), paths, state, seed)
        mixed = Path(tmp) / "mixed.parquet"
        write_table(probed.training_table(second, train[tasks[1]]), mixed)
        fit_local(TaskJob(probed, second, str(mixed), cfg, spec, str(resolve(spec))))
        trace = json.loads((Path(state) / "dgg_steps" / f"{tasks[1]}.json").read_text())
    return {"seed": seed, "probes": probed.probes, "trace": trace}


def summary(runs: list[dict]) -> dict:
    """Means over every probe of every seed, and DGG's injection and scaling rates."""
    probes = [p for r in runs for p in r["probes"]]
    injected = [i for r in runs for i in r["trace"]["injected"]]
    scaled = [s for r in runs for s, i in zip(r["trace"]["scaled"], r["trace"]["injected"]) if i]
    out = {"probes": len(probes), "injection_rate": sum(injected) / max(len(injected), 1),
           "scaled_share_of_injections": sum(scaled) / max(len(scaled), 1)}
    for key in ("cos_displacement", "cos_batch_gradient"):
        values = [p[key] for p in probes]
        out[key] = {"mean": statistics.fmean(values), "share_positive": sum(v > 0 for v in values) / len(values),
                    "min": min(values), "max": max(values)}
    return out


def plot(runs: list[dict], path: Path) -> None:
    """Cosines and ‖θ − θ*‖ over task 2's steps, one line per seed."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for r in runs:
        steps = [p["step"] for p in r["probes"]]
        top.plot(steps, [p["cos_displacement"] for p in r["probes"]], label=f"cos(θ−θ*, g₁) seed {r['seed']}")
        top.plot(steps, [p["cos_batch_gradient"] for p in r["probes"]], "--", label=f"cos(∇L, g₁) seed {r['seed']}")
        bottom.plot(r["trace"]["step"], r["trace"]["d_norm"], label=f"‖θ−θ*‖ seed {r['seed']}")
        bottom.plot(r["trace"]["step"], r["trace"]["grad_norm"], ":", label=f"‖∇L‖ seed {r['seed']}")
    top.axhline(0, color="grey", lw=0.5)
    top.set_ylabel("cosine with task-1 gradient")
    bottom.set_ylabel("norm")
    bottom.set_xlabel("task-2 step")
    top.legend(fontsize=6)
    bottom.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="builtin:tiny")
    parser.add_argument("--tasks", default="colour,shape", help="task 1,task 2 (built-in tasks)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dgg_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = tuple(args.tasks.split(","))
    if len(tasks) != 2:
        raise SystemExit(f"--tasks takes two built-in tasks, got {args.tasks!r}")
    console, runs, started = Console(), [], time.time()
    for seed in args.seeds:
        runs.append(run_seed(args.backbone, tasks, args.steps, args.every, seed))
        s = summary(runs[-1:])
        console.log(f"seed {seed}: cos(θ−θ*, g₁) {s['cos_displacement']['mean']:+.3f}, "
                    f"cos(∇L, g₁) {s['cos_batch_gradient']['mean']:+.3f}")
    result = {"backbone": args.backbone, "tasks": tasks, "steps": args.steps, "every": args.every,
              "seconds": time.time() - started, "summary": summary(runs), "runs": runs}
    write_text(args.out, json.dumps(result, indent=1))
    plot(runs, args.out.with_suffix(".png"))
    table = Table(title=f"DGG during {tasks[1]}: agreement with the true {tasks[0]} gradient ({len(args.seeds)} seeds)")
    for column in ("direction", "mean cosine", "share > 0", "min", "max"):
        table.add_column(column)
    for key, name in (("cos_displacement", "θ − θ* (ĝ)"), ("cos_batch_gradient", "∇L of the step (rows + replay)")):
        c = result["summary"][key]
        table.add_row(name, f"{c['mean']:+.3f}", f"{c['share_positive']:.2f}", f"{c['min']:+.3f}", f"{c['max']:+.3f}")
    console.print(table)
    console.print(f"injection rate {result['summary']['injection_rate']:.3f}, rescaled share of injections "
                  f"{result['summary']['scaled_share_of_injections']:.2f}; {result['seconds']:.0f} s; "
                  f"{args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
