"""The diffusion base: what SDXL, SVD and the upscaler deployments have in common.

They load a diffusers pipeline the same way (`load_diffusers_pipeline`, on the replica's one
`TorchThread`), run it there and report each denoising step back to an async generator
(`stream_from_thread`), fail their health check when a running request stops making progress
(`StallWatch`), and stop when their caller goes away (a client hang-up, or a job cancel through
its DeploymentHandle response): the worker thread sees a flag at its next step. No storage is
read for that. `DiffusionDeployment` holds these for a model's deployment class.

Torch and diffusers are imported inside the functions, so importing this is cheap; still, the
models' contracts never import it (pyproject.toml's import-linter contract): what they share is
in deployments/limits.py.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, ClassVar

from pydantic import BaseModel

from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.limits import MAX_SEED  # noqa: F401  (where the deployments have always found it)
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage


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


def check_cancelled(cancelled: threading.Event, when: str) -> None:
    """Stop a run whose caller went away: `when` says where ("before it started", ...)."""
    if cancelled.is_set():
        raise JobCancelledError(f"cancelled {when}", None)


class DiffusionDeployment:
    """Base of a diffusion model's Serve deployment class (apply `@serve.deployment` to the subclass).

    `__init__` validates the config (`config_cls`: it has `model`, `device`, `dtype`, `variant`,
    `storage_root`, `storage_options`, `torch_num_threads`, `gpu_memory_fraction` and
    `stall_timeout_s`), starts the replica's torch thread, loads the pipeline there
    (`pipeline_factory`, default `load_pipeline`: the diffusers class named `pipeline_class`), and
    opens storage. The subclass then sets `self.limits`, its contract's Limits (which may need the
    loaded pipeline, e.g. the UNet's frame count), which `describe()` returns.

    A request runs as `_stream(check_inputs, run, request)`: `check_inputs` (the contract's
    `check()` first, then reading and decoding inputs) in a worker thread, then `run(prepared,
    emit, cancelled)` on the torch thread, one at a time under `_pipe_lock`; what `run` emits is
    yielded as it comes, then its response. `run` calls `check_cancelled` where it can stop.
    """

    thread_name: ClassVar[str] = "diffusion"  # the torch thread's name
    config_cls: ClassVar[type[BaseModel]]
    pipeline_class: ClassVar[str]  # the diffusers pipeline class `load_pipeline` loads

    limits: Any  # the contract's Limits; set by the subclass once the pipeline is loaded

    def __init__(self, config: BaseModel | dict, pipeline_factory: Callable[[Any], Any] | None = None):
        self.config = self.config_cls.model_validate(config)
        self.stall_watch = StallWatch(self.config.stall_timeout_s)
        self.torch_thread, self.pipe = start_torch(self.thread_name, self.config,
                                                   pipeline_factory or self.load_pipeline)
        self.pipe.set_progress_bar_config(disable=True)
        self._pipe_lock = threading.Lock()  # one pipeline call at a time: the scheduler keeps per-call state
        self.storage = Storage(self.config.storage_root, self.config.storage_options)

    @classmethod
    def load_pipeline(cls, config: Any):
        import diffusers  # heavy: only where a pipeline is loaded

        return load_diffusers_pipeline(getattr(diffusers, cls.pipeline_class), config.model, device=config.device,
                                       dtype=config.dtype, variant=config.variant)

    # --- public methods, called through DeploymentHandles -------------------------------------

    def describe(self) -> dict:
        """The model's limits and defaults, as the ingress reads them."""
        return self.limits.describe()

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")
        self.stall_watch.check()

    # --- for the subclass ------------------------------------------------------------------------

    async def _stream(self, check_inputs: Callable[[Any], Any], run: Callable[[Any, Callable, threading.Event], Any],
                     request: Any) -> AsyncIterator[Any]:
        """Yields what `run` emits, then its response (see the class docstring)."""
        prepared = await asyncio.to_thread(check_inputs, request)  # may read storage and decode media
        async for event in stream_from_thread(functools.partial(run, prepared), self.stall_watch,
                                              self.torch_thread.executor):
            yield event

    @staticmethod
    async def _last(stream: AsyncIterator[Any]) -> Any:
        """A stream's final event: the response, for the non-streaming entry points."""
        result = None
        async for event in stream:
            result = event
        return result

    def _input_bytes(self, key: str, param: str) -> bytes:
        """A stored input (e.g. an earlier output); a bad or missing key is the request's error."""
        return get_input_bytes(self.storage, key, param)
