"""How well a backbone's frozen features serve one built-in task: a plain PEFT LoRA learns it alone.

    .venv/bin/python benchmarks/task_probe.py --backbone builtin:tiny --tasks shape,exists,relation

For each task: a LoRA (the default placement and rank, both towers) trained on 1000 train rows
for a fixed number of steps (no early stopping, no Ray), then greedy answers on 200 test rows.
Prints accuracy, the final training loss and the commonest answers, so a collapse to one answer
shows at once. Used to judge a backbone recipe before a full `make run`.
"""

from __future__ import annotations

import argparse
import collections
import math
import random
import time

import pyarrow.compute as pc
import torch

from strata.adapters.lora import add_adapter, trainable_parameters
from strata.backbone.load import load_backbone
from strata.config import AdapterSpec, BackboneSpec
from strata.data.benchmark import generate_task
from strata.data.collate import collate, encode_table
from strata.eval.scoring import score, scorer_for
from strata.generation import generate


def probe(backbone: str, task: str, steps: int, lr: float, seed: int = 0) -> dict:
    """Train one LoRA on `task` alone for `steps` steps; return its test accuracy and answers."""
    torch.manual_seed(seed)
    model, processor = load_backbone(BackboneSpec(source=backbone))
    model = add_adapter(model, "probe", AdapterSpec())
    table = generate_task(task, seed, n_train=1000, n_val=0, n_test=200)
    train = encode_table(processor, table.filter(pc.equal(table["split"], "train")), with_answers=True)
    test = table.filter(pc.equal(table["split"], "test"))
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    rng, loss_ema = random.Random(seed), None
    model.train()
    for _ in range(steps):
        batch = collate(train.select(rng.sample(range(len(train)), 32)), processor.tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
    model.eval()
    said = [g.text for g in generate(model, processor, encode_table(processor, test, with_answers=False), 12)]
    answers = test["answer"].to_pylist()
    scores = score(said, answers, scorer_for(answers))
    return {"accuracy": 100.0 * sum(scores) / len(scores), "loss": loss_ema,
            "answers": collections.Counter(said).most_common(4)}


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
