"""A replica whose worker stalls fails its health check, though its event loop still answers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.diffusion import StallWatch, stream_from_thread


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_resets_the_stall_timer_and_finished_work_is_forgotten():
    clock = FakeClock()
    watch = StallWatch(30, clock)
    watch.check()  # nothing running
    token = watch.start()
    clock.now += 29
    watch.check()
    watch.beat(token)
    clock.now += 29
    watch.check()  # 29 s since the last step
    clock.now += 2
    with pytest.raises(RuntimeError, match="no progress for 31 s"):
        watch.check()
    watch.finish(token)
    watch.check()


def test_no_limit_never_fails():
    clock = FakeClock()
    watch = StallWatch(None, clock)
    watch.start()
    clock.now += 10**6
    watch.check()


def test_a_worker_stuck_inside_stream_from_thread_fails_the_check():
    clock = FakeClock()
    watch = StallWatch(60, clock)
    release = threading.Event()

    def run(emit, cancelled):
        emit("step 1")
        release.wait(10)  # the stuck kernel
        emit("step 2")
        return "done"

    async def main():
        events = []
        stream = stream_from_thread(run, watch)
        events.append(await stream.__anext__())
        clock.now += 61
        with pytest.raises(RuntimeError, match="1 running request"):
            watch.check()
        release.set()
        events += [event async for event in stream]
        return events

    assert asyncio.run(main()) == ["step 1", "step 2", "done"]
    watch.check()  # finished: healthy again
