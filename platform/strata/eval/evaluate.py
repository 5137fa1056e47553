"""Accuracy by generation: greedy answers for a task's rows, scored by the task's scorer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    processor,
    enc: Encoded,
    adapter_names: list[str] | None = None,
    batch_size: int = 256,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy answers for every row; `adapter_names` picks an adapter per row (mixed batches)."""
    tok = processor.tokenizer
    answers: list[str] = []
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        batch = collate(enc.select(idx), tok.pad_token_id, left_pad=True)
        batch.pop("labels")
        extra = {"adapter_names": [adapter_names[i] for i in idx]} if adapter_names else {}
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra,
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
    """Generate and score one task's rows; `None` in adapter_names means the bare backbone."""
    names = None
    if any(a is not None for a in adapter_names):
        names = [a if a is not None else "__base__" for a in adapter_names]
    kind = scorer_for(enc.answers)
    budget = 12 if kind == "exact_match" else 64  # short answers end in a few tokens
    preds = generate(model, processor, enc, names, batch_size, budget)
    scores = score(preds, enc.answers, kind)
    return TaskResult(100.0 * sum(scores) / len(scores), kind, preds, scores, list(adapter_names))
