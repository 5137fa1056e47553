"""The micro-batcher: concurrent requests share one call, within a bounded wait, and a bad one fails alone."""

from __future__ import annotations

import asyncio

import pytest

from strata.serving.batcher import MicroBatcher


def test_concurrent_items_for_different_adapters_share_one_call() -> None:
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(items)
        return [f"{i}!" for i in items]

    async def main() -> list[str]:
        batcher = MicroBatcher(run, max_batch_size=4, wait_s=0.05)
        return await asyncio.gather(*(batcher.submit(f"adapter{i}") for i in range(6)))

    assert asyncio.run(main()) == [f"adapter{i}!" for i in range(6)]
    assert calls == [["adapter0", "adapter1", "adapter2", "adapter3"], ["adapter4", "adapter5"]]


def test_a_failing_item_fails_alone_and_the_batcher_keeps_serving() -> None:
    def run(items: list[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return [i * 2 for i in items]

    async def main():
        batcher = MicroBatcher(run, max_batch_size=8, wait_s=0.01)
        first = await asyncio.gather(*(batcher.submit(i) for i in (1, 13, 3)), return_exceptions=True)
        return first, await batcher.submit(5)

    first, after = asyncio.run(main())
    assert first[0] == 2 and first[2] == 6 and isinstance(first[1], ValueError) and after == 10


def test_a_lone_request_waits_no_longer_than_the_bound() -> None:
    async def main() -> float:
        batcher = MicroBatcher(lambda items: items, max_batch_size=64, wait_s=0.02)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit("x")
        return loop.time() - start

    assert asyncio.run(main()) < 0.5
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        MicroBatcher(lambda items: items, max_batch_size=0)


def test_an_item_run_again_goes_on_in_the_next_batch_beside_those_that_arrived() -> None:
    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(items)
        return [f"{i}+" if i.count("+") < 1 and i == "a" else f"{i}!" for i in items]

    async def main() -> list[str]:
        batcher = MicroBatcher(run, max_batch_size=4, wait_s=0.01,
                               again=lambda item, result: result if result.endswith("+") else None)
        first = asyncio.ensure_future(batcher.submit("a"))
        await asyncio.sleep(0)
        return await asyncio.gather(first, batcher.submit("b"))

    assert asyncio.run(main()) == ["a+!", "b!"]
    assert calls == [["a", "b"], ["a+"]] or calls == [["a"], ["a+", "b"]]


def test_a_batch_pauses_for_waiting_requests_after_admit_after_tokens_or_one_when_they_outnumber_it() -> None:
    from strata.serving.batcher import should_pause

    assert not should_pause(5, waiting=0, running=1, admit_after=2)  # nobody waits
    assert not should_pause(1, waiting=1, running=8, admit_after=2)  # one newcomer: re-reading 8 rows waits
    assert should_pause(2, waiting=1, running=8, admit_after=2)
    assert should_pause(1, waiting=7, running=1, admit_after=2)  # a lone row, seven waiting: at once
    assert not should_pause(0, waiting=7, running=1, admit_after=2)  # nothing generated yet
    assert not should_pause(9, waiting=7, running=1, admit_after=0)  # admission off
