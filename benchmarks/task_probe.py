"""How well a backbone's frozen features serve one built-in task: SeqLoRA's adapter learns it alone.

    .venv/bin/python benchmarks/task_probe.py --backbone builtin:tiny --tasks shape,exists,relation

For each task: the default adapter (LoRA r8 on both towers) trained on 1000 train rows for a fixed
number of steps, with no early stopping and no Ray (`fit_local`: the loop and install that a run
uses), then greedy answers on 200 test rows through `evaluate_task`. Prints accuracy, the training
loss and the commonest answers, so a collapse to one answer shows at once. Used to judge a
backbone recipe before a full `make run`.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import torch

from strata.backbone.load import load_backbone, resolve
from strata.config import BackboneSpec, RunConfig, TrainConfig
from strata.data.benchmark import generate_task
from strata.data.collate import encode_table
from strata.data.schema import write_table
from strata.eval.evaluate import evaluate_task
from strata.hooks import TaskContext
from strata.strategies import make_strategy
from strata.train.driver import TaskJob, fit_local


def probe(backbone: str, task: str, steps: int, lr: float, seed: int = 0) -> dict:
    """Train one adapter on `task` alone for `steps` steps; return its test accuracy and answers."""
    spec = BackboneSpec(source=backbone)
    table = generate_task(task, seed, n_train=1000, n_val=0, n_test=200)
    strategy = make_strategy("seqlora", RunConfig(strategies=("seqlora",)))
    train = TrainConfig(steps=steps, lr=lr, val_every=0, checkpoint_every=0, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "train.parquet"
        write_table(table.filter(pc.equal(table["split"], "train")), rows)
        ctx = TaskContext(0, task, (), {task: str(rows)}, str(Path(tmp) / "state"), seed)
        trained = fit_local(TaskJob(strategy, ctx, str(rows), train, spec, str(resolve(spec))))
        model, processor = load_backbone(spec)
        model = strategy.load_eval(model, ctx)
        test = encode_table(processor, table.filter(pc.equal(table["split"], "test")), with_answers=False)
        result = evaluate_task(model, processor, test, strategy.route(ctx, model, processor, test, task))
    return {"accuracy": result.accuracy, "loss": trained["loss"],
            "answers": collections.Counter(result.predictions).most_common(4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="builtin:tiny", help="builtin:NAME or a local directory")
    parser.add_argument("--tasks", default="shape,exists,relation", help="comma-separated built-in tasks")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for task in args.tasks.split(","):
        started = time.time()
        r = probe(args.backbone, task, args.steps, args.lr)
        print(f"{task}: accuracy {r['accuracy']:.1f}, loss {r['loss']:.3f}, answers {r['answers']} "
              f"({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
