"""Accuracy by generation: greedy answers for a task's rows, scored by the task's scorer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from peft import PeftModel

from strata.data.collate import Encoded, collate
from strata.eval.scoring import score, scorer_for


@dataclass(frozen=True)
class TaskResult:
    """One task evaluated once: accuracy in percent plus every prediction."""

    accuracy: float
    scorer: str
    predictions: list[str]
    scores: list[float]
    adapters: list[str | None]


@contextlib.contextmanager
def active_adapter(model: torch.nn.Module, name: str | None):
    """Run the block with adapter `name` active; None runs the bare backbone."""
    peft = isinstance(model, PeftModel)  # Strata-kind adapters have one active state
    if name is not None and peft:
        model.set_adapter(name)
    with model.disable_adapter() if name is None and peft else contextlib.nullcontext():
        yield model


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor,
    enc: Encoded,
    batch_size: int = 256,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers for every row, with whatever adapter is active."""
    tok = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        batch = collate(enc.select(idx), tok.pad_token_id, left_pad=True)
        batch.pop("labels")
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]  # (B, new tokens)
        answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate_task(
    model: torch.nn.Module,
    processor,
    enc: Encoded,
    adapter_names: list[str | None],
    batch_size: int = 256,
) -> TaskResult:
    """Generate and score one task's rows; `None` in adapter_names means the bare backbone.

    Rows are grouped by adapter and each group runs with that adapter active: routing is
    near-perfect, so this avoids PEFT's mixed-batch path, which loops over adapters per layer.
    """
    kind = scorer_for(enc.answers)
    budget = 12 if kind == "exact_match" else 64  # short answers end in a few tokens
    preds = [""] * len(enc)
    for name in dict.fromkeys(adapter_names):
        idx = [i for i, a in enumerate(adapter_names) if a == name]
        with active_adapter(model, name):
            out = generate(model, processor, enc.select(idx), batch_size, budget)
        for i, p in zip(idx, out):
            preds[i] = p
    scores = score(preds, enc.answers, kind)
    return TaskResult(100.0 * sum(scores) / len(scores), kind, preds, scores, list(adapter_names))
