"""Token streaming out of a generating batch: a per-request tap, and text deltas from token ids.

A batch generates in a worker thread (`serving/batcher.py`); each streamed request has a `Tap`
that the thread feeds one token id at a time, and that the replica's event loop drains as the
tokens come. Setting `cancelled` (the client went away) is read by generation after every step,
which ends that row (`strata.generation`).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import re
from collections.abc import Callable
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

    async def drain(self) -> list[int] | None:
        """Every token that has come since the last call (waiting for one), or None once the batch returned.

        Tokens that pile up while the event loop was busy go out as one delta, so a loaded replica
        sends fewer, larger events instead of falling further behind.
        """
        tokens = [await self.queue.get()]
        while tokens[-1] is not END and not self.queue.empty():
            tokens.append(self.queue.get_nowait())
        if tokens[-1] is END:
            self.queue.put_nowait(END)  # the next call sees the end as well
            tokens.pop()
        return tokens or None

    def close(self) -> None:
        """The row's batch returned (or failed): the reader stops waiting for tokens."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, END)


class Detokenizer:
    """Text deltas whose concatenation is exactly the finished answer's text (`decode(...).strip()`).

    Decoding each token alone would break words that span tokens and multi-byte characters, so
    the whole answer so far is decoded each time, and only its settled part is sent: leading
    whitespace is dropped, and trailing whitespace or an incomplete character waits for the next
    token. Where the tokenizer's tokens are bytes (byte-level BPE, or SentencePiece's byte
    fallback), a trailing U+FFFD waits only if its bytes could still become a character; a byte
    that is never valid UTF-8 (what an untrained model often emits) is sent at once.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.tokens, self.sent, self.waited = tokenizer, [], "", 0
        self.bytes_of = token_bytes(tokenizer)
        self.special = set(getattr(tokenizer, "all_special_ids", ()))

    def add(self, token: int) -> str:
        """The new text this token settles (often "", rarely text that a later token could change)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") and self._incomplete():
            self.waited += 1
            return ""
        self.waited = 0
        if not text.startswith(self.sent):  # a tokenizer that rewrites earlier text: wait for the end
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def _incomplete(self) -> bool:
        """Whether the answer may end inside a multi-byte character that later tokens complete."""
        tail = [t for t in self.tokens[-4:] if t not in self.special]  # a character has at most 4 bytes
        raw = [self.bytes_of(p) for p in self.tokenizer.convert_ids_to_tokens(tail)] if self.bytes_of else [None]
        if None in raw:  # bytes unknown: wait, but for at most the 3 bytes that could complete it
            return self.waited < 3
        reader = codecs.getincrementaldecoder("utf-8")("replace")
        reader.decode(b"".join(raw), final=False)
        return bool(reader.getstate()[0])  # bytes held back: a valid start of a character

    def rest(self, final_text: str) -> str:
        """Whatever of the finished answer has not been sent yet."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""


@functools.cache
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), mapped back to the byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


def token_bytes(tokenizer) -> Callable[[str], bytes | None] | None:
    """How to read a token's raw bytes from its vocabulary entry, for the tokenizers whose tokens are
    bytes; None for any other (their trailing U+FFFD falls back to waiting a few tokens)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return None
    kinds = re.findall(r'"type":\s*"(\w+)"', decoder.__getstate__().decode())
    if "ByteLevel" in kinds:
        alphabet = _byte_alphabet()
        return lambda piece: bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else None
    if "ByteFallback" in kinds:
        return lambda piece: bytes([int(piece[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) \
            else piece.replace("\u2581", " ").encode()
    return None
