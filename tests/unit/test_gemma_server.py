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


def test_streams_in_flight_share_the_replicas_message_budget():
    """With n streams on the replica each waits n intervals between messages (capped), so the
    replica's message rate stays about 1000 / interval a second; first chunks still go at once."""
    from types import SimpleNamespace

    from deployments.llm.server import GemmaServer

    server = GemmaServer.__new__(GemmaServer)  # only its stream batching: no engine
    server._llm_config = SimpleNamespace(experimental_configs={"stream_batching_interval_ms": 50,
                                                               "stream_batching_max_interval_ms": 120})

    async def go():
        loop = asyncio.get_running_loop()
        sources = [Source() for _ in range(3)]
        streams = [server._batch_output_stream(source.stream()) for source in sources]
        for source in sources:
            source.queue.put_nowait("a")
        started = loop.time()
        firsts = [await stream.__anext__() for stream in streams]
        first_s = loop.time() - started
        in_flight = server._streams
        sources[0].queue.put_nowait("b")
        started = loop.time()
        second = await streams[0].__anext__()
        waited = loop.time() - started
        for source in sources:
            source.queue.put_nowait(None)
        rest = [[batch async for batch in stream] for stream in streams]
        return firsts, first_s, in_flight, second, waited, rest, server._streams

    firsts, first_s, in_flight, second, waited, rest, after = run(go())
    assert firsts == [["a"]] * 3 and first_s < 0.05 and in_flight == 3
    assert second == ["b"] and 0.1 <= waited < 0.6  # 3 x 50 ms, capped at 120 ms (not 50 ms)
    assert rest == [[], [], []] and after == 0


def test_a_lone_stream_keeps_the_base_interval():
    from types import SimpleNamespace

    from deployments.llm.server import GemmaServer

    server = GemmaServer.__new__(GemmaServer)
    server._llm_config = SimpleNamespace(experimental_configs={"stream_batching_interval_ms": 300,
                                                               "stream_batching_max_interval_ms": 5000})

    async def go():
        loop = asyncio.get_running_loop()
        source = Source()
        stream = server._batch_output_stream(source.stream())
        source.queue.put_nowait("a")
        assert await stream.__anext__() == ["a"]
        source.queue.put_nowait("b")
        started = loop.time()
        assert await stream.__anext__() == ["b"]
        waited = loop.time() - started
        source.queue.put_nowait(None)
        await stream.aclose()
        return waited, server._streams

    waited, after = run(go())
    assert 0.2 <= waited < 1.0 and after == 0  # one interval (300 ms), not a shared multiple
