"""The one generation path: evaluation, the promotion gate and serving all decode through `generate`.

Rows are decoded together in batches; each row has its own token budget and stops at its own end
of sequence. `on_token(row, token_id)` is called for every row's token as soon as it is decoded,
before the batch finishes, which is what a streaming response needs. Which adapter a row runs with
is the caller's business (a PEFT adapter made active, or serving's per-row mixed LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from strata.data.collate import Encoded, collate

TokenCallback = Callable[[int, int], None]  # (row index in `enc`, token id)


@dataclass(frozen=True)
class Generated:
    """One row's answer: its tokens (without the end of sequence), text, and why it ended."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop": end of sequence; "length": the row's token budget ran out


class _Budgets(StoppingCriteria):
    """Stops each row once it has its own number of new tokens (generate pads rows that stopped)."""

    def __init__(self, prompt_len: int, budgets: list[int]) -> None:
        self.prompt_len, self.budgets = prompt_len, torch.tensor(budgets)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.budgets.to(input_ids.device)


class _Rows(BaseStreamer):
    """Hands each live row's newly decoded token to the callback, step by step."""

    def __init__(self, offset: int, budgets: list[int], eos: int | None, on_token: TokenCallback) -> None:
        self.offset, self.left, self.eos, self.on_token = offset, list(budgets), eos, on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call passes the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.left[row] <= 0:
                continue
            if token == self.eos:
                self.left[row] = 0
                continue
            self.left[row] -= 1
            self.on_token(self.offset + row, token)

    def end(self) -> None:
        """Nothing to flush: every token was handed out as it came."""


def _finish(row: list[int], budget: int, eos: int | None, tokenizer) -> Generated:
    row = row[:budget]
    stop = eos in row
    row = row[: row.index(eos)] if stop else row
    return Generated(row, tokenizer.decode(row, skip_special_tokens=True).strip(), "stop" if stop else "length")


@torch.no_grad()
def generate(model: torch.nn.Module, processor, enc: Encoded, max_new_tokens: int | list[int],
             temperature: float = 0.0, batch_size: int = 256, on_token: TokenCallback | None = None) -> list[Generated]:
    """Decode an answer for every row of `enc` (greedy at temperature 0, else sampled)."""
    tok = processor.tokenizer
    budgets = [max_new_tokens] * len(enc) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(enc) or min(budgets, default=1) < 1:
        raise ValueError(f"need one token budget >= 1 per row: {len(enc)} rows, budgets {budgets[:8]}")
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out: list[Generated] = []
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        rows = [budgets[i] for i in idx]
        batch = collate(enc.select(idx), tok.pad_token_id, left_pad=True)
        batch.pop("labels")
        prompt_len = batch["input_ids"].shape[1]
        streamer = _Rows(start, rows, tok.eos_token_id, on_token) if on_token else None
        ids = model.generate(**batch, max_new_tokens=max(rows), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, streamer=streamer,
                             stopping_criteria=StoppingCriteriaList([_Budgets(prompt_len, rows)]), **sampling)
        out += [_finish(r, b, tok.eos_token_id, tok) for r, b in zip(ids[:, prompt_len:].tolist(), rows)]
    return out
