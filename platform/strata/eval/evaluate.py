"""Accuracy by generation: greedy answers for a task's rows (strata/generation.py, the path serving
uses), scored by the task's scorer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from peft import PeftModel

from strata.data.collate import Encoded
from strata.eval.scoring import score, scorer_for
from strata.generation import generate
from strata.routing import Routed


@dataclass(frozen=True)
class TaskResult:
    """One task evaluated once: accuracy in percent plus every prediction."""

    accuracy: float
    scorer: str
    predictions: list[str]
    scores: list[float]
    adapters: list[str | None]
    router_distances: list[float | None]  # relative distance to the routed task (strata/routing.py); None: not routed


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str | None):
    """Run the block with adapter `name` active; None runs the bare backbone."""
    peft = isinstance(model, PeftModel)  # Strata-kind adapters have one active state
    if name is not None and peft:
        model.set_adapter(name)
    with model.disable_adapter() if name is None and peft else contextlib.nullcontext():
        yield model


def evaluate_task(
    model: torch.nn.Module,
    processor,
    enc: Encoded,
    routes: list[Routed | None],
    batch_size: int = 256,
) -> TaskResult:
    """Generate and score one task's rows, each with the adapter it was routed to (None: the bare backbone).

    Rows are grouped by adapter and each group runs with that adapter active: routing is
    near-perfect, so this avoids PEFT's mixed-batch path, which loops over adapters per layer.
    """
    adapter_names = [r.task if r else None for r in routes]
    kind = scorer_for(enc.answers)
    budget = 12 if kind == "exact_match" else 64  # short answers end in a few tokens
    preds = [""] * len(enc)
    for name in dict.fromkeys(adapter_names):
        idx = [i for i, a in enumerate(adapter_names) if a == name]
        with active_adapter(model, name):
            out = generate(model, processor, enc.select(idx), budget, batch_size=batch_size)
        for i, g in zip(idx, out):
            preds[i] = g.text
    scores = score(preds, enc.answers, kind)
    return TaskResult(100.0 * sum(scores) / len(scores), kind, preds, scores, adapter_names,
                      [r.distance if r else None for r in routes])
