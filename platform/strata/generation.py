"""The one generation path: evaluation, the promotion gate and serving all decode through `generate`.

Rows are decoded together in batches; each row has its own token budget and stops at its own end
of sequence (or never, with `ignore_eos`). `on_token(row, token_id)` is called for every row's token
as soon as it is decoded, before the batch finishes, which is what a streaming response needs, and
`cancelled(row)` ends a row early (its client went away): it is marked finished, gets no more
tokens, and the batch ends as soon as no row is left. Which adapter a row runs with is the
caller's business (a PEFT adapter made active, or serving's per-row mixed LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from strata.data.collate import Encoded, collate

TokenCallback = Callable[[int, int], None]  # (row index in `enc`, token id)
Cancelled = Callable[[int], bool]  # row index in `enc` -> its client went away
Pause = Callable[[int], bool]  # new tokens so far -> stop the batch here (others are waiting to join it)


@dataclass(frozen=True)
class Generated:
    """One row's answer: its tokens (without the end of sequence), text, and why it ended."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop": end of sequence; "length": the budget ran out; "cancelled": the client left;
    # "paused": `pause` stopped the batch first


class _Budgets(StoppingCriteria):
    """Stops each row once it has its own number of new tokens, or its client went away (generate
    pads rows that stopped, and ends the batch when every row has)."""

    def __init__(self, prompt_len: int, budgets: list[int], offset: int, cancelled: Cancelled | None,
                 pause: Pause | None) -> None:
        self.prompt_len, self.budgets, self.offset, self.cancelled = prompt_len, torch.tensor(budgets), offset, cancelled
        self.pause, self.paused = pause, False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = (input_ids.shape[1] - self.prompt_len) >= self.budgets.to(input_ids.device)
        if self.pause is not None and self.pause(input_ids.shape[1] - self.prompt_len):
            self.paused = True
            return torch.ones_like(done)
        if self.cancelled is not None:
            gone = [self.cancelled(self.offset + row) for row in range(len(self.budgets))]
            done = done | torch.tensor(gone, device=input_ids.device)
        return done


class _NoEos(LogitsProcessor):
    """Forbids the end of sequence on the rows that asked to run to their full budget."""

    def __init__(self, rows: list[bool], eos: int) -> None:
        self.rows, self.eos = torch.tensor(rows), eos

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[self.rows.to(scores.device), self.eos] = -float("inf")
        return scores


class _Rows(BaseStreamer):
    """Hands each live row's newly decoded token to the callback, step by step."""

    def __init__(self, offset: int, budgets: list[int], eos: int | None, on_token: TokenCallback,
                 cancelled: Cancelled | None) -> None:
        self.offset, self.left, self.eos, self.on_token = offset, list(budgets), eos, on_token
        self.cancelled = cancelled or (lambda row: False)
        self.handed = [0] * len(budgets)  # tokens handed out per row
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first call passes the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.view(-1).tolist()):
            if self.left[row] <= 0:
                continue
            if token == self.eos or self.cancelled(self.offset + row):
                self.left[row] = 0
                continue
            self.left[row] -= 1
            self.handed[row] += 1
            self.on_token(self.offset + row, token)

    def end(self) -> None:
        """Nothing to flush: every token was handed out as it came."""


def _finish(row: list[int], budget: int, eos: int | None, tokenizer, cancelled: int | None,
            steps: int, paused: bool) -> Generated:
    row = row[: min(budget, steps)]
    if cancelled is not None:  # what it got before its client left
        row = row[:cancelled]
        return Generated(row, tokenizer.decode(row, skip_special_tokens=True).strip(), "cancelled")
    stop = eos in row
    row = row[: row.index(eos)] if stop else row
    reason = "stop" if stop else "length" if len(row) >= budget or not paused else "paused"
    return Generated(row, tokenizer.decode(row, skip_special_tokens=True).strip(), reason)


def _unpadded(row: list[int], pad: int | None) -> int:
    return row.index(pad) if pad in row else len(row)


@torch.no_grad()
def generate(model: torch.nn.Module, processor, enc: Encoded, max_new_tokens: int | list[int],
             temperature: float = 0.0, batch_size: int = 256, on_token: TokenCallback | None = None,
             top_p: float = 1.0, ignore_eos: bool | list[bool] = False,
             cancelled: Cancelled | None = None, pause: Pause | None = None) -> list[Generated]:
    """Decode an answer for every row of `enc` (greedy at temperature 0, else sampled with `top_p`).

    `pause(n)`, asked after every step, stops the batch after its n-th new token: rows that had not
    ended come back as "paused" with their tokens so far, to be continued in a batch that new
    requests join (serving's admission; the tokens are those an unpaused batch gives).
    """
    tok = processor.tokenizer
    budgets = [max_new_tokens] * len(enc) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(enc) or min(budgets, default=1) < 1:
        raise ValueError(f"need one token budget >= 1 per row: {len(enc)} rows, budgets {budgets[:8]}")
    no_eos = [ignore_eos] * len(enc) if isinstance(ignore_eos, bool) else list(ignore_eos)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 \
        else {"do_sample": False}
    out: list[Generated] = []
    for start in range(0, len(enc), batch_size):
        idx = list(range(start, min(start + batch_size, len(enc))))
        rows = [budgets[i] for i in idx]
        batch = collate(enc.select(idx), tok.pad_token_id, left_pad=True)
        batch.pop("labels")
        prompt_len = batch["input_ids"].shape[1]
        streamer = _Rows(start, rows, tok.eos_token_id, on_token, cancelled) if on_token else None
        forced = [no_eos[i] for i in idx]
        criteria = _Budgets(prompt_len, rows, start, cancelled, pause)
        ids = model.generate(**batch, max_new_tokens=max(rows), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, streamer=streamer,
                             logits_processor=LogitsProcessorList([_NoEos(forced, tok.eos_token_id)] if any(forced) else []),
                             stopping_criteria=StoppingCriteriaList([criteria]),
                             **sampling)
        new = ids[:, prompt_len:].tolist()
        # A cancelled row keeps the tokens its client was sent (without a streamer: up to the padding).
        kept = [(streamer.handed[j] if streamer else _unpadded(new[j], tok.pad_token_id))
                if cancelled and cancelled(i) else None for j, i in enumerate(idx)]
        steps = ids.shape[1] - prompt_len
        out += [_finish(r, b, tok.eos_token_id, tok, k, steps, criteria.paused) for r, b, k in zip(new, rows, kept)]
    return out
