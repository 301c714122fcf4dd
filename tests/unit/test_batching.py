"""The continuous batcher without a model: what forms a batch, in what order, cancel and failures."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batching import ContinuousBatcher


class Model:
    """A stand-in pipeline: records each call, runs while `busy` is clear, fails on request."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.fail_next = False

    async def run(self, items: list[tuple[str, int, str]]) -> list[str]:
        self.calls.append([name for name, _, _ in items])
        self.started.set()
        await self.release.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA out of memory")
        return [f"{name}:done" for name, _, _ in items]


def batcher_for(model: Model, max_size: int = 8, idle_wait_s: float = 0.0) -> ContinuousBatcher:
    return ContinuousBatcher(model.run, max_size=max_size, size_fn=lambda item: item[1],
                             key_fn=lambda item: item[2], idle_wait_s=idle_wait_s)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def submit_all(batcher, items):
    tasks = [asyncio.ensure_future(batcher.submit(item)) for item in items]
    await asyncio.sleep(0)  # they reach the queue in this order
    return tasks


def test_a_lone_request_on_an_idle_model_starts_at_once():
    async def go():
        model = Model()
        batcher = batcher_for(model, idle_wait_s=0.0)
        task = asyncio.ensure_future(batcher.submit(("a", 1, "64")))
        await model.started.wait()  # no batch window: the model is already running it
        assert model.calls == [["a"]]
        model.release.set()
        return await task

    assert run(go()) == "a:done"


def test_requests_collect_while_the_model_is_busy_and_run_together():
    async def go():
        model = Model()
        batcher = batcher_for(model)
        first = asyncio.ensure_future(batcher.submit(("first", 1, "64")))
        await model.started.wait()
        later = await submit_all(batcher, [(f"r{i}", 2, "64") for i in range(3)])
        assert batcher.queued == 3
        model.release.set()
        return await asyncio.gather(first, *later), model.calls, list(batcher.batch_sizes)

    results, calls, sizes = run(go())
    assert results == ["first:done", "r0:done", "r1:done", "r2:done"]
    assert calls == [["first"], ["r0", "r1", "r2"]]
    assert sizes == [1, 6]


def test_the_oldest_request_leads_and_compatible_ones_join_it_up_to_the_limit():
    async def go():
        model = Model()
        batcher = batcher_for(model, max_size=8)
        blocker = asyncio.ensure_future(batcher.submit(("blocker", 1, "64")))
        await model.started.wait()
        waiting = await submit_all(batcher, [("a", 4, "64"), ("b", 1, "32"), ("c", 4, "64"), ("d", 2, "64"),
                                             ("e", 1, "32")])
        model.release.set()
        await asyncio.gather(blocker, *waiting)
        return model.calls

    # a and c fill 8 images; d (same key) no longer fits and waits; b (the oldest left) leads next
    assert run(go()) == [["blocker"], ["a", "c"], ["b", "e"], ["d"]]


def test_requests_without_a_key_run_alone():
    async def go():
        model = Model()
        batcher = ContinuousBatcher(model.run, max_size=8, size_fn=lambda item: item[1], key_fn=lambda item: None)
        blocker = asyncio.ensure_future(batcher.submit(("blocker", 1, "")))
        await model.started.wait()
        waiting = await submit_all(batcher, [("x", 1, ""), ("y", 1, "")])
        model.release.set()
        await asyncio.gather(blocker, *waiting)
        return model.calls

    assert run(go()) == [["blocker"], ["x"], ["y"]]


def test_a_cancelled_waiting_request_never_runs():
    async def go():
        model = Model()
        batcher = batcher_for(model)
        blocker = asyncio.ensure_future(batcher.submit(("blocker", 1, "64")))
        await model.started.wait()
        kept, dropped = await submit_all(batcher, [("kept", 1, "64"), ("dropped", 1, "64")])
        dropped.cancel()
        await asyncio.sleep(0)
        assert batcher.queued == 1
        model.release.set()
        results = await asyncio.gather(blocker, kept)
        with pytest.raises(asyncio.CancelledError):
            await dropped
        return results, model.calls

    results, calls = run(go())
    assert results == ["blocker:done", "kept:done"]
    assert calls == [["blocker"], ["kept"]]


def test_a_failed_batch_fails_only_its_own_requests():
    async def go():
        model = Model()
        batcher = batcher_for(model)
        model.fail_next = True
        failing = asyncio.ensure_future(batcher.submit(("doomed", 1, "64")))
        await model.started.wait()
        after = await submit_all(batcher, [("next", 1, "64")])
        model.release.set()
        with pytest.raises(RuntimeError, match="out of memory"):
            await failing
        return await after[0]

    assert run(go()) == "next:done"


def test_a_worker_cancelled_mid_batch_fails_its_requests_and_the_next_submit_runs():
    """Nobody may wait forever on a batch whose worker was cancelled while it ran: its requests fail
    at once, those still queued run on the worker the next submit starts."""
    async def go():
        model = Model()
        batcher = batcher_for(model)
        running = asyncio.ensure_future(batcher.submit(("first", 1, "64")))
        await model.started.wait()
        queued = await submit_all(batcher, [("queued", 1, "64")])
        batcher._worker.cancel()
        with pytest.raises(RuntimeError, match="interrupted"):
            await asyncio.wait_for(running, 5)
        model.release.set()
        later = asyncio.ensure_future(batcher.submit(("later", 1, "64")))
        return await asyncio.wait_for(queued[0], 5), await asyncio.wait_for(later, 5)

    assert run(go()) == ("queued:done", "later:done")


def test_per_item_errors_reach_only_their_request():
    async def run_batch(items):
        return [ValueError(f"bad {name}") if name == "bad" else name for name, _, _ in items]

    async def go():
        batcher = ContinuousBatcher(run_batch, max_size=8, size_fn=lambda item: item[1], key_fn=lambda item: item[2])
        return await asyncio.gather(batcher.submit(("good", 1, "k")), batcher.submit(("bad", 1, "k")),
                                    return_exceptions=True)

    good, bad = run(go())
    assert good == "good" and isinstance(bad, ValueError) and str(bad) == "bad bad"


def test_an_item_over_the_limit_is_refused():
    async def go():
        return await batcher_for(Model(), max_size=8).submit(("huge", 9, "64"))

    with pytest.raises(ValueError, match="larger than the batch limit 8"):
        run(go())


def test_the_batcher_follows_a_new_event_loop():
    model = Model()
    model.release.set()
    batcher = batcher_for(model)
    assert asyncio.run(batcher.submit(("one", 1, "64"))) == "one:done"
    assert asyncio.run(batcher.submit(("two", 1, "64"))) == "two:done"  # a second loop, a new worker
