"""KL drift: how far a model's answer distributions moved from an anchor's, on a fixed anchor set.

Seed 000 watches KL(anchor ‖ current) on held-out data after every adapter update as a leading
indicator of forgetting. The anchor is the state that was served before; the anchor set is
teacher-forced through the shared chat template, and KL is averaged over answer tokens only,
the positions the loss trains (prompt-token predictions are not what an adapter is asked for).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from strata.data.collate import Encoded, collate
from strata.data.schema import read_table
from strata.eval.evaluate import active_adapter


@torch.no_grad()
def answer_log_probs(model: torch.nn.Module, enc: Encoded, names: list[str | None], pad_id: int,
                     batch_size: int = 64) -> list[torch.Tensor]:
    """Per row, the (answer tokens, vocab) log-probabilities before each answer token."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(enc)
    for name in dict.fromkeys(names):
        idx = [i for i, a in enumerate(names) if a == name]
        with active_adapter(model, name):
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                batch = collate(enc.select(chunk), pad_id)
                labels = batch.pop("labels")
                logp = model(**batch).logits[:, :-1].float().log_softmax(-1)
                answer = labels[:, 1:] != -100  # position p predicts token p+1
                for j, i in enumerate(chunk):
                    out[i] = logp[j][answer[j]]
    return out


def mean_kl(anchor: list[torch.Tensor], current: list[torch.Tensor]) -> float:
    """Mean over every answer token of KL(anchor ‖ current), in nats."""
    a, c = torch.cat(anchor), torch.cat(current)
    if a.shape != c.shape or not len(a):
        raise ValueError(f"anchor and current log-probs must cover the same answer tokens, got "
                         f"{tuple(a.shape)} and {tuple(c.shape)}")
    return float((a.exp() * (a - c)).sum(-1).mean())


def anchor_rows(vals: dict[str, pa.Table], tasks: list[str], rows: int) -> pa.Table | None:
    """The default anchor set: the first val rows of each given task, `rows` in all (None if no task)."""
    if not tasks:
        return None
    each = max(rows // len(tasks), 1)
    return pa.concat_tables([vals[t].slice(0, each) for t in tasks])


def anchor_table(path: Path, rows: int) -> pa.Table:
    """An anchor set: a Parquet file's rows, or the `val` rows of every dataset in a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if not p.name.endswith(".train.parquet"))
        if not files:
            raise FileNotFoundError(f"no <task>.parquet datasets in {path}")
        tables = [read_table(f) for f in files]
        tables = [t.filter(pc.equal(t["split"], "val")) for t in tables]
        each = max(rows // len(tables), 1)
        return pa.concat_tables([t.slice(0, each) for t in tables])
    return read_table(path).slice(0, rows)
