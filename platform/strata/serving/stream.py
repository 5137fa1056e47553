"""Token streaming out of a generating batch: a per-request tap, and text deltas from token ids.

A batch generates in a worker thread (`serving/batcher.py`); each streamed request has a `Tap`
that the thread feeds one token id at a time, and that the replica's event loop drains as the
tokens come. Setting `cancelled` (the client went away) is read by generation after every step,
which ends that row (`strata.generation`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

END = None  # queued when the batch that held the row has returned (None survives pickling by value)


@dataclass
class Tap:
    """One streamed request's token ids, handed from the generating thread to the event loop."""

    loop: asyncio.AbstractEventLoop
    streamed: bool = True  # False: a plain request, whose tap only carries the cancel flag
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False

    def put(self, token: int) -> None:
        """Called from the generating thread for each new token of this row."""
        if self.streamed:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def close(self) -> None:
        """The row's batch returned (or failed): the reader stops waiting for tokens."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, END)


class Detokenizer:
    """Text deltas whose concatenation is exactly the finished answer's text (`decode(...).strip()`).

    Decoding each token alone would break words that span tokens and multi-byte characters, so
    the whole answer so far is decoded each time, and only its settled part is sent: leading
    whitespace is dropped, and trailing whitespace or a possibly incomplete character waits for
    the next token.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.sent, self.waited = tokenizer, [], "", 0

    def add(self, token: int) -> str:
        """The new text this token settles (often "", rarely text that a later token could change)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        # Maybe part of a multi-byte character: wait, but for at most the 3 bytes that could complete it
        # (a byte that is never valid UTF-8 would otherwise hold the whole answer back).
        if text.endswith("\ufffd") and self.waited < 3:
            self.waited += 1
            return ""
        self.waited = 0
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, final_text: str) -> str:
        """Whatever of the finished answer has not been sent yet."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""
