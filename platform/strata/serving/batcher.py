"""A micro-batcher that groups concurrent requests, whatever adapter each names, into one call.

Ray Serve's `serve.batch` splits a batch by multiplexed model id, so requests for different
adapters would never share a forward. This one keeps them together: the first request of a batch
waits at most `wait_s` for company, and a batch holds at most `max_batch_size` requests. A batch
runs in a worker thread, so the replica's event loop stays free to stream tokens out while it
generates; `lock` is held for the whole call, and whoever else changes the model (an adapter load)
takes it first, so nothing touches the model while a batch generates. `again` lets a batch end
early: an item it returns goes back to the front of the queue, and runs on in the next batch,
beside the requests that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """`await submit(item)` returns `run([... item ...])`'s answer for that item."""

    def __init__(self, run: Callable[[list[T]], list[R]], max_batch_size: int = 16, wait_s: float = 0.005,
                 again: Callable[[T, R], T | None] | None = None) -> None:
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and wait_s >= 0, got {max_batch_size} and {wait_s}")
        self.run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self.again = again or (lambda item, result: None)  # an item to run again instead of this result
        self.queue: list[tuple[T, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None
        self.lock = asyncio.Lock()
        self.sizes: deque[int] = deque(maxlen=1000)  # the latest batches' sizes, for stats and tests

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its answer."""
        future = asyncio.get_running_loop().create_future()
        self.queue.append((item, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.queue:
            if len(self.queue) < self.max_batch_size:
                await asyncio.sleep(self.wait_s)  # let concurrent requests join
            batch, self.queue = self.queue[: self.max_batch_size], self.queue[self.max_batch_size :]
            self.sizes.append(len(batch))
            await self._answer(batch)
            await asyncio.sleep(0)  # let the answered requests resume before the next batch

    async def _answer(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            async with self.lock:
                results = await asyncio.to_thread(self.run, [item for item, _ in batch])
        except Exception:  # noqa: BLE001 - retried one by one below, so one bad item fails alone
            if len(batch) == 1:
                raise_into(batch[0][1])
                return
            for one in batch:
                await self._answer([one])
            return
        requeued = []
        for (item, future), result in zip(batch, results):
            if (nxt := self.again(item, result)) is not None:  # unfinished: it goes on in the next batch
                requeued.append((nxt, future))
            elif not future.done():
                future.set_result(result)
        self.queue[:0] = requeued


def raise_into(future: asyncio.Future) -> None:
    """Hand the exception being handled to the waiting request."""
    if not future.done():
        future.set_exception(sys.exc_info()[1])


def should_pause(generated: int, waiting: int, running: int, admit_after: int) -> bool:
    """Whether a running batch should stop so that waiting requests join it (serving's admission).

    It stops once it has `admit_after` new tokens; after its first one already when the waiting
    requests are at least as many as its rows, since re-reading its rows then costs no more than
    the newcomers' own prefill. `admit_after` 0 never stops a batch.
    """
    if admit_after <= 0 or waiting == 0:
        return False
    return generated >= (1 if waiting >= running else admit_after)

