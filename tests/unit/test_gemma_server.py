"""The LLM deployment's stream batching: the first chunk at once, later ones merged per interval."""

from __future__ import annotations

import asyncio

import pytest

from deployments.llm.server import FirstChunkBatcher


class Source:
    """An engine stream the test feeds by hand."""

    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.closed = False

    async def stream(self):
        try:
            while (item := await self.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed = True


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_the_first_chunk_goes_at_once_later_ones_merge_and_the_end_flushes():
    async def go():
        source = Source()
        batches = FirstChunkBatcher(source.stream(), interval_s=5).stream()
        source.queue.put_nowait("a")
        first = await asyncio.wait_for(batches.__anext__(), 1)  # not after the 5 s interval
        for item in ("b", "c", None):  # two more tokens, then the end
            source.queue.put_nowait(item)
        second = await asyncio.wait_for(batches.__anext__(), 1)  # the end sends at once
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
        return first, second

    assert run(go()) == (["a"], ["b", "c"])


def test_later_chunks_wait_for_the_interval():
    async def go():
        source = Source()
        batches = FirstChunkBatcher(source.stream(), interval_s=0.2).stream()
        source.queue.put_nowait("a")
        assert await batches.__anext__() == ["a"]
        source.queue.put_nowait("b")
        loop = asyncio.get_running_loop()
        started = loop.time()
        second = await batches.__anext__()
        source.queue.put_nowait(None)
        return second, loop.time() - started

    second, waited = run(go())
    assert second == ["b"] and waited >= 0.1  # held back until the interval since "a" had passed


def test_an_engine_error_reaches_the_caller_after_what_came_before():
    async def go():
        source = Source()
        batches = FirstChunkBatcher(source.stream(), interval_s=0.01).stream()
        source.queue.put_nowait("a")
        source.queue.put_nowait(RuntimeError("engine died"))
        return [batch async for batch in batches]

    with pytest.raises(RuntimeError, match="engine died"):
        run(go())


def test_closing_the_stream_stops_the_engine_stream():
    async def go():
        source = Source()
        batches = FirstChunkBatcher(source.stream(), interval_s=0.01).stream()
        source.queue.put_nowait("a")
        assert await batches.__anext__() == ["a"]
        await batches.aclose()  # the client hung up
        await asyncio.sleep(0)
        return source.closed

    assert run(go()) is True
