"""Continuous batching for the diffusion deployments.

Ray Serve's `@serve.batch` (2.60) forms the next batch while the previous one still runs:
`_BatchQueue._process_batches` cuts a batch on its `batch_wait_timeout_s` clock, starts a task
that only then waits for the `max_concurrent_batches` semaphore, and loops straight back. Under
load, batches are cut by the clock rather than filled while the model is busy, and a lone request
always waits the full window. Measured on the tiny SDXL (benchmarks/bench_images.py).

Here requests collect while the model is busy. When it frees, it takes the oldest waiting request
and every compatible request behind it (same batch key), up to `max_size` (counted by `size_fn`,
e.g. images). A request on an idle model starts at once, unless `idle_wait_s` asks it to wait
that long for company. A caller that gives up while its request waits is taken out of the queue;
one that gives up while its batch runs is the deployment's to handle (its item carries a flag).
A failed batch fails only its own requests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, Hashable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Waiting(Generic[T]):
    item: T
    key: Hashable
    size: int
    future: asyncio.Future = field(repr=False)


class ContinuousBatcher(Generic[T, R]):
    """`await batcher.submit(item)` → the item's result from `run(batch)`.

    `run` gets a list of compatible items and returns one result (or exception) per item, in order.
    Batches run one at a time, on the event loop of the first `submit`.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]], *, max_size: int,
                 size_fn: Callable[[T], int] = lambda item: 1,
                 key_fn: Callable[[T], Hashable | None] = lambda item: None, idle_wait_s: float = 0.0):
        self.run = run
        self.max_size = max_size
        self.size_fn = size_fn
        self.key_fn = key_fn
        self.idle_wait_s = idle_wait_s
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # sizes of the batches run, latest last
        self._waiting: deque[_Waiting[T]] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alone = 0  # items that batch with nothing (key None) get keys of their own

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not those in the running batch)."""
        return sum(1 for w in self._waiting if not w.future.done())

    async def submit(self, item: T) -> R:
        size = self.size_fn(item)
        if size > self.max_size:
            raise ValueError(f"an item of size {size} is larger than the batch limit {self.max_size}")
        self._start()
        key = self.key_fn(item)
        if key is None:
            self._alone += 1
            key = ("alone", self._alone)
        waiting = _Waiting(item, key, size, self._loop.create_future())
        self._waiting.append(waiting)
        self._wake.set()
        try:
            return await waiting.future
        finally:
            if not waiting.future.done() or waiting.future.cancelled():
                try:  # the caller gave up while it waited: it never runs
                    self._waiting.remove(waiting)
                except ValueError:
                    pass

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._wake = loop, asyncio.Event()
            self._waiting = deque(w for w in self._waiting if not w.future.done())
            self._worker = loop.create_task(self._serve())

    def _take(self) -> list[_Waiting[T]]:
        """The oldest live request and the compatible ones behind it, in arrival order, up to max_size."""
        while self._waiting and self._waiting[0].future.done():
            self._waiting.popleft()
        if not self._waiting:
            return []
        first = self._waiting[0]
        batch, total, rest = [], 0, deque()
        for waiting in self._waiting:
            if waiting.future.done():
                continue
            if waiting.key == first.key and total + waiting.size <= self.max_size:
                batch.append(waiting)
                total += waiting.size
            else:
                rest.append(waiting)
        self._waiting = rest
        return batch

    async def _serve(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.idle_wait_s > 0 and self._waiting:
                await asyncio.sleep(self.idle_wait_s)  # an idle model waits this long for company
            while batch := self._take():
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Waiting[T]]) -> None:
        self.batch_sizes.append(sum(w.size for w in batch))
        try:
            results: Sequence[Any] = await self.run([w.item for w in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the whole call failed: its own items fail, the next batch runs
            results = [exc] * len(batch)
        except BaseException as exc:
            # The worker itself is being cancelled (or the process is exiting) mid-batch: its callers
            # get an error now rather than wait forever on futures nobody will resolve. (The next
            # submit starts a new worker for the requests still queued.)
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(RuntimeError(f"the batch was interrupted ({type(exc).__name__})"))
            raise
        for waiting, result in zip(batch, results):
            if waiting.future.done():
                continue
            if isinstance(result, BaseException):
                waiting.future.set_exception(result)
            else:
                waiting.future.set_result(result)
