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
import contextlib
import functools
import logging
import os
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator

from pydantic import BaseModel

from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.limits import MAX_SEED  # noqa: F401  (where the deployments have always found it)
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage

logger = logging.getLogger("ray.serve")


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


# --- fast paths (deployments/fast_paths.py: the config switches) -----------------------------------

# Regional compilation's blocks when a model class names none (`_repeated_blocks`): the transformer
# blocks of the spatio-temporal UNet (SVD) as well as the spatial one.
REPEATED_BLOCKS = ("BasicTransformerBlock", "TemporalBasicTransformerBlock")


def set_sdpa_backends(attention: str) -> None:
    """Which kernels torch's scaled_dot_product_attention may use in this process (CUDA only):
    `flash` or `cudnn` turn the other fused kernels off and keep math as the fallback; anything
    else leaves torch's own choice. Process-wide flags: a replica runs one model."""
    import torch

    if not torch.cuda.is_available():
        return
    wanted = {"flash": "flash", "cudnn": "cudnn"}.get(attention)
    torch.backends.cuda.enable_flash_sdp(wanted in (None, "flash"))
    torch.backends.cuda.enable_mem_efficient_sdp(wanted is None)
    torch.backends.cuda.enable_cudnn_sdp(wanted in (None, "cudnn"))
    torch.backends.cuda.enable_math_sdp(True)


def _to_channels_last(module) -> None:
    """Every 4-D weight and buffer (the convolutions') in channels-last layout. `Module.to(memory_format=)`
    would refuse SVD's 5-D temporal convolutions; they keep their layout."""
    import torch

    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.dim() == 4:
            tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)


def _compile_unet(unet, fast) -> str:
    kwargs: dict[str, Any] = {"fullgraph": fast.compile_fullgraph, "dynamic": fast.compile_dynamic,
                              "backend": fast.compile_backend}
    if fast.compile_backend == "inductor" or fast.compile_mode != "default":
        kwargs["mode"] = fast.compile_mode
    if fast.compile == "full":
        unet.compile(**kwargs)  # nn.Module.compile: in place, the UNet stays the same object
        return "full"
    # Regional compilation (https://docs.pytorch.org/tutorials/recipes/regional_compilation.html): each
    # repeated block compiled once and its compiled code reused by every instance.
    names = tuple(getattr(unet, "_repeated_blocks", None) or REPEATED_BLOCKS)
    blocks = [m for m in unet.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"regional compile: no {names} block in {type(unet).__name__}")
    for block in blocks:
        block.compile(**kwargs)
    return f"regional ({len(blocks)} blocks)"


def apply_fast_paths(pipe, fast) -> dict[str, Any]:
    """Applies the config's fast paths (a `DiffusionFastPaths`, or None) to a loaded pipeline, in
    place. Returns what was applied, and why a switch this pipeline cannot take was skipped.

    Applying again with more switches on adds them (benchmarks/gpu_check.py stacks them one by one);
    compiling is the last step and is not undone.
    """
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

    applied: dict[str, Any] = {}
    if fast is None:
        return applied
    unet, vae = getattr(pipe, "unet", None), getattr(pipe, "vae", None)

    # 1. The VAE: a replacement (e.g. the fp16-fix one), its precision, tiling and slicing.
    if fast.vae_model and vae is not None:
        replacement = type(vae).from_pretrained(fast.vae_model, torch_dtype=vae.dtype)
        vae = replacement.to(vae.device)
        pipe.register_modules(vae=vae)
        applied["vae_model"] = fast.vae_model
    if fast.vae_upcast is not None and vae is not None and "force_upcast" in vae.config:
        vae.register_to_config(force_upcast=fast.vae_upcast)
        applied["vae_upcast"] = fast.vae_upcast
    for switch, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
        if getattr(fast, switch) and vae is not None:
            try:
                getattr(vae, method)()  # diffusers' AutoencoderMixin raises where the VAE has none
                applied[switch] = True
            except (AttributeError, NotImplementedError):
                applied[switch] = f"skipped: {type(vae).__name__} has no {method.removeprefix('enable_')}"

    # 2. Attention: diffusers' processors, and torch's SDPA kernels.
    if unet is not None:
        if fast.attention == "classic":
            unet.set_attn_processor(AttnProcessor())
        elif any(isinstance(p, AttnProcessor) for p in unet.attn_processors.values()):
            unet.set_attn_processor(AttnProcessor2_0())  # back from classic (a stack of switches)
        applied["attention"] = fast.attention
    set_sdpa_backends(fast.attention)

    # 3. Memory layout and fused projections.
    if fast.channels_last:
        for module in (unet, vae):
            if module is not None:
                _to_channels_last(module)
        applied["channels_last"] = True
    if fast.fuse_qkv and unet is not None and not getattr(pipe, "atelier_fused_qkv", None):
        # As diffusers' UNet2DConditionModel.fuse_qkv_projections and StableDiffusionMixin's do it, for
        # any UNet: every Attention's projections fused, then the fused processor. Dict copies
        # throughout: set_attn_processor empties a dict it is given.
        unfused = dict(unet.attn_processors)
        added_kv = [name for name, p in unfused.items() if "Added" in type(p).__name__]
        if added_kv:
            applied["fuse_qkv"] = f"skipped: added KV projections ({added_kv[0]})"
        else:
            for module in (unet, vae) if type(vae).__name__ == "AutoencoderKL" else (unet,):
                with torch.no_grad():
                    for attention in module.modules():
                        if isinstance(attention, Attention):
                            attention.fuse_projections(fuse=True)
                module.set_attn_processor(FusedAttnProcessor2_0())
            pipe.atelier_fused_qkv = {"fused": dict(unet.attn_processors), "unfused": unfused}
            applied["fuse_qkv"] = "unet and vae" if type(vae).__name__ == "AutoencoderKL" else "unet"

    # 4. torch.compile, last: it traces the modules as the steps above left them.
    if fast.compile != "off" and unet is not None and not getattr(unet, "atelier_compiled", False):
        applied["compile"] = _compile_unet(unet, fast)
        unet.atelier_compiled = True
    return applied


@contextlib.contextmanager
def unfused_qkv(pipe, active: bool = True) -> Iterator[None]:
    """While a LoRA is active: the UNet's attention back on its own to_q/to_k/to_v (where the
    adapter's layers sit) instead of the fused projections, which hold only the base weights."""
    fused = getattr(pipe, "atelier_fused_qkv", None)
    if not active or not fused:
        yield
        return
    pipe.unet.set_attn_processor(dict(fused["unfused"]))
    try:
        yield
    finally:
        pipe.unet.set_attn_processor(dict(fused["fused"]))


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
    `config` has `torch_num_threads` and `gpu_memory_fraction`, and may have `fast_paths`, which
    are applied to the loaded (or injected) pipeline."""
    thread = TorchThread(name)

    def setup():
        configure_torch(config.torch_num_threads, config.gpu_memory_fraction)
        pipe = load(config)
        pipe.atelier_fast_paths = apply_fast_paths(pipe, getattr(config, "fast_paths", None))
        return pipe

    return thread, thread.call(setup)


def load_diffusers_pipeline(pipeline_cls, model: str, *, device: str = "auto", dtype: str = "auto",
                            variant: str | None = None):
    """`pipeline_cls.from_pretrained(model)` in the configured precision, moved to its device."""
    device = resolve_device(device)
    # where a local folder is really read from (a relative path is the replica's cwd: its node's own
    # copy of a shipped working_dir); the cluster tests check it per node
    logger.info("loading %s from %s", pipeline_cls.__name__, os.path.abspath(model) if os.path.isdir(model) else model)
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
