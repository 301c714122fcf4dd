"""Torch setup, progress streaming and cancel shared by the diffusion deployments.

SDXL, SVD and the upscaler load a diffusers pipeline the same way, run it in a worker thread and
report each denoising step back to an async generator. Cancel reaches them as their caller going
away (a client hang-up, or a job cancel through its DeploymentHandle response): the worker thread
sees a flag at its next step. No storage is read for it.
Torch is imported inside the functions, like in the deployments, so importing this is cheap.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

from deployments.errors import InvalidRequestError
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage

MAX_SEED = 2**32 - 1


def resolve_device(device: str) -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str):
    """'auto' → float16 on CUDA (the released weights' precision), float32 on CPU."""
    import torch

    if dtype == "auto":
        dtype = "float16" if device == "cuda" else "float32"
    return getattr(torch, dtype)


def configure_torch(num_threads: int | None = None, gpu_memory_fraction: float | None = None) -> None:
    import torch

    if num_threads:
        torch.set_num_threads(num_threads)
    if gpu_memory_fraction and torch.cuda.is_available():
        # Models sharing a GPU by fraction each cap their allocator, so one cannot starve another.
        torch.cuda.set_per_process_memory_fraction(gpu_memory_fraction)


class TorchThread:
    """The one thread a replica runs its torch work on: loading, every pipeline call, adapter loads.

    Measured on the 2-core CI machine (tiny SDXL, 64², 4 steps, one pipeline call at a time): a
    call takes about 130 ms as long as one thread has run torch work in the process, and about
    260 ms on every thread, the first one too, once a second thread has. `asyncio.to_thread` hands
    each call to whichever pool thread is free, so a replica paid that on every request. Neither
    OpenMP's thread count (OMP_NUM_THREADS=1 is as slow) nor glibc's malloc arenas
    (MALLOC_ARENA_MAX=1) explain it; one long-lived thread avoids it.
    """

    def __init__(self, name: str):
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{name}")

    def call(self, fn: Callable, *args) -> Any:
        """Run `fn` there and wait (start-up, sync callers)."""
        return self.executor.submit(fn, *args).result()

    async def run(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))


def start_torch(name: str, config: Any, load: Callable[[Any], Any]) -> tuple[TorchThread, Any]:
    """A replica's torch thread, with torch configured and the pipeline loaded on it:
    `config` has `torch_num_threads` and `gpu_memory_fraction`."""
    thread = TorchThread(name)

    def setup():
        configure_torch(config.torch_num_threads, config.gpu_memory_fraction)
        return load(config)

    return thread, thread.call(setup)


def load_diffusers_pipeline(pipeline_cls, model: str, *, device: str = "auto", dtype: str = "auto",
                            variant: str | None = None):
    """`pipeline_cls.from_pretrained(model)` in the configured precision, moved to its device."""
    device = resolve_device(device)
    pipe = pipeline_cls.from_pretrained(
        model, torch_dtype=resolve_dtype(dtype, device), variant=variant, use_safetensors=True
    )
    return pipe.to(device)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def get_input_bytes(storage: Storage, key: str, param: str) -> bytes:
    """An input stored under `key` (e.g. an earlier output); a bad or missing key is the caller's error."""
    try:
        return storage.get_bytes(key)
    except InvalidKeyError as exc:
        raise InvalidRequestError(f"{param} is not a valid storage key: {exc}", param) from exc
    except ObjectNotFoundError as exc:
        raise InvalidRequestError(f"no stored object at {param} {key!r}", param) from exc


async def drain_events(events: asyncio.Queue, task: asyncio.Future) -> AsyncIterator[Any]:
    """Yields events from `events` as they arrive while `task` runs, then the rest, then its result.

    The task's exception, if it raised one, propagates.
    """
    while True:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
            continue
        getter.cancel()
        while not events.empty():
            yield events.get_nowait()
        yield task.result()
        return


class StallWatch:
    """Work in flight and when each piece last made progress.

    A replica whose worker thread hangs (a stuck kernel, a deadlock) still answers Serve's health
    check from its event loop; `check_health` calling `check()` makes it fail instead, so Serve
    replaces the replica.
    """

    def __init__(self, stall_after_s: float | None, clock: Callable[[], float] = time.monotonic):
        self.stall_after_s = stall_after_s
        self.clock = clock
        self._last_progress: dict[int, float] = {}
        self._next = 0

    def start(self) -> int:
        self._next += 1
        self._last_progress[self._next] = self.clock()
        return self._next

    def beat(self, token: int) -> None:
        if token in self._last_progress:
            self._last_progress[token] = self.clock()

    def finish(self, token: int) -> None:
        self._last_progress.pop(token, None)

    def check(self) -> None:
        if not self.stall_after_s:
            return
        now = self.clock()
        stalled = [now - t for t in list(self._last_progress.values()) if now - t > self.stall_after_s]
        if stalled:
            raise RuntimeError(f"{len(stalled)} running request(s) made no progress for {max(stalled):.0f} s "
                               f"(limit {self.stall_after_s:.0f} s)")


async def stream_from_thread(run: Callable[[Callable[[Any], None], threading.Event], Any],
                             watch: StallWatch | None = None, executor: Executor | None = None) -> AsyncIterator[Any]:
    """Runs `run(emit, cancelled)` on `executor` (a replica's TorchThread's; default: asyncio's
    pool); yields what it emits, as it does, then its return value.

    `cancelled` is set when the consumer goes away before the run ends, so the run can stop at its
    next step. With a `watch`, every emitted event counts as progress."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    token = watch.start() if watch else None
    task = None

    def emit(event: Any) -> None:
        if watch:
            watch.beat(token)
        loop.call_soon_threadsafe(events.put_nowait, event)

    try:
        task = asyncio.ensure_future(loop.run_in_executor(executor, run, emit, cancelled))
        async for event in drain_events(events, task):
            yield event
    finally:
        if task is not None and not task.done():
            cancelled.set()
        if watch:
            watch.finish(token)
