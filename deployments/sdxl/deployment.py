"""SDXL deployment: text-to-image, image-to-image and inpainting, batched across requests.

One base pipeline is loaded; the img2img and inpaint pipelines share its components through
`from_pipe`, so no second copy of the weights is held. Requests collect while the pipeline is busy
and, when it frees, the oldest one and every compatible one behind it (same size, steps, guidance,
LoRA) run as one pipeline call, up to `max_batch_images` (continuous batching,
`deployments/batching.py`). Each image has its own seeded generator, so it does not depend on what
it was batched with. PNG encoding and storage writes run in the request's own coroutine, off the
pipeline's critical path, so the next batch starts as soon as the last one's denoising ends. A
request whose caller goes away (a client hang-up, or a job cancel through its DeploymentHandle
response) leaves the queue, or stops its pipeline call at the next step once no one in the call
still wants it; the replica reads no storage for that.

LoRA adapters from the registry (`storage/registry.py`) are loaded per request by name
(`lora="corgi"` or `"corgi:2"`) through Ray Serve model multiplexing: `get_lora` is a
`@serve.multiplexed` loader, so each replica keeps an LRU of adapters and the router sends a
request made with `handle.options(multiplexed_model_id=...)` to a replica that holds its adapter.
Adapters live inside the one base pipeline (`load_lora_weights(adapter_name=...)`); a pipeline
call activates its request's adapter (`set_adapters`) or none (`disable_lora`), and an evicted
adapter is deleted (`delete_adapters`). The base pipeline is never reloaded.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from pydantic import AfterValidator, BaseModel, Field
from ray import serve

from deployments.styles import StylePreset, load_styles
from deployments.batching import ContinuousBatcher
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import check_size, decode_image, encode_png
from deployments import metrics
from deployments.diffusion import (
    MAX_SEED,
    StallWatch,
    drain_events,
    load_diffusers_pipeline,
    random_seed,
    start_torch,
)
from storage.fs import Storage
from storage.keys import output_key
from storage.registry import LoraRecord, LoraRegistry, LoraRegistryError

logger = logging.getLogger("ray.serve")

ALLOWED_N = (1, 2, 4, 8)
DEFAULT_MAX_LORAS_PER_REPLICA = 4
Mode = Literal["text_to_image", "image_to_image", "inpaint"]


def _check_n(n: int) -> int:
    if n not in ALLOWED_N:
        raise ValueError(f"n must be one of {list(ALLOWED_N)}")
    return n


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be empty")
    return prompt


def check_denoising_steps(mode: str, steps: int, strength: float) -> None:
    """An input image is denoised for int(steps × strength) of the steps (diffusers' get_timesteps);
    none left would fail inside the pipeline, so it is the request's error."""
    if mode != "text_to_image" and int(steps * strength) < 1:
        raise InvalidRequestError(
            f"steps={steps} at strength {strength:g} leaves no denoising step (int(steps × strength) = 0); "
            f"use at least {math.ceil(1 / strength)} steps or a higher strength", "steps")


# Field types shared with the HTTP protocol models.
ImageCount = Annotated[int, AfterValidator(_check_n)]
Prompt = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_check_prompt)]


class SDXLConfig(BaseModel):
    model: str = Field(description="Folder or hub id of an SDXL base pipeline (diffusers layout).")
    model_name: str = "sdxl"
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    default_steps: int = 30
    max_steps: int = 100
    default_guidance_scale: float = 5.0
    max_batch_images: int = Field(8, ge=8, description="Images per pipeline call; at least one n=8 request.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1, description=(
        "How long a request that finds the model idle waits for others to share its call. Under load, "
        "requests collect while the model is busy, whatever this is."))
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    stall_timeout_s: float | None = Field(600, gt=0, description="Fail the health check when a running request "
                                                                 "makes no progress for this long.")
    styles_file: str | None = None
    max_loras_per_replica: int = Field(DEFAULT_MAX_LORAS_PER_REPLICA, ge=1,
                                       description="LoRA adapters a replica keeps loaded (LRU).")


class SDXLRequest(BaseModel):
    """What the deployment runs; the ingress maps the OpenAI shapes onto it."""

    mode: Mode = "text_to_image"
    prompt: Prompt
    negative_prompt: str | None = Field(None, max_length=4000)
    n: ImageCount = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    strength: float = Field(0.8, gt=0, le=1)
    style: str | None = None
    lora: str | None = Field(None, max_length=300, description="A registered LoRA: 'name' (latest) or 'name:version'.")
    lora_scale: float = Field(1.0, ge=0, le=4, description="The adapter's weight.")
    image: bytes | None = None
    image_key: str | None = None
    mask: bytes | None = None
    mask_key: str | None = None
    job_id: str | None = None
    store: bool = False
    output_id: str | None = None


class SDXLImage(BaseModel):
    seed: int
    width: int
    height: int
    png: bytes | None = None
    key: str | None = None


class SDXLResponse(BaseModel):
    model: str
    mode: Mode
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    images: list[SDXLImage]
    lora: str | None = Field(None, description="The adapter used, as name:version.")
    # Lineage: what made the images, besides the request (the PNGs carry the same in text chunks).
    source: str | None = Field(None, description="Folder or hub id of the base pipeline.")
    lora_sha256: str | None = Field(None, description="sha256 of the adapter's weights file.")
    batch_images: int = Field(description="Images in the pipeline call this request ran in.")
    elapsed_s: float


class SDXLProgress(BaseModel):
    step: int
    total_steps: int


@dataclass
class _Prepared:
    """A request after `check_inputs`: defaults and style applied, images decoded."""

    request: SDXLRequest
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    image: Any = None
    mask: Any = None
    lora: LoadedLora | None = None

    def batch_key(self) -> tuple | None:
        if self.request.mode != "text_to_image":
            return None  # each edit carries its own init image; run alone
        # one pipeline call runs one adapter at one weight; and no negative prompt (zero embeddings)
        # differs from an encoded one, so the two never share a call
        lora = (self.lora.adapter_name, self.request.lora_scale) if self.lora else None
        return (self.width, self.height, self.steps, self.guidance_scale, lora, bool(self.negative_prompt))


class LoadedLora:
    """An adapter loaded in the pipeline: what the multiplexed loader returns, one per model id.

    Ray's multiplexer calls `__del__` when it evicts the model id (LRU); that releases the
    adapter, which is deleted from the pipeline once no model id and no running request use it.
    """

    def __init__(self, model_id: str, adapter_name: str, record: LoraRecord, release: Callable[[str], None]):
        self.model_id = model_id
        self.adapter_name = adapter_name
        self.record = record
        self._release = release

    def __del__(self):
        release, self._release = self._release, None  # Ray calls it, then the GC may again
        if release is not None:
            try:
                release(self.adapter_name)
            except ImportError:  # the interpreter is shutting down; the pipeline goes with it
                pass

    def __repr__(self) -> str:
        return f"LoadedLora({self.model_id!r} -> {self.record.id}, adapter {self.adapter_name!r})"


@dataclass
class _AdapterState:
    record: LoraRecord
    refs: int = 0  # LoadedLora handles (model ids) holding it
    in_use: int = 0  # requests between loading it and finishing their pipeline call


class _LocalLoraLRU:
    """Stands in for `@serve.multiplexed` outside a Serve replica (unit tests, scripts): the same
    LRU of model ids, the same `__del__` on eviction."""

    def __init__(self, load: Callable, capacity: int):
        self.load, self.capacity = load, capacity
        self.models: OrderedDict[str, LoadedLora] = OrderedDict()
        self._lock: asyncio.Lock | None = None

    async def __call__(self, model_id: str) -> LoadedLora:
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:
            if model_id not in self.models:
                if len(self.models) >= self.capacity:
                    _, evicted = self.models.popitem(last=False)
                    await asyncio.to_thread(evicted.__del__)
                self.models[model_id] = await self.load(model_id)
            return self.models[model_id]


def adapter_name_for(record: LoraRecord) -> str:
    """The peft adapter name of a registered version (peft names cannot hold '.')."""
    digest = hashlib.sha1(record.name.encode()).hexdigest()[:6]
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', record.name)}_v{record.version}_{digest}"


def routed(handle, request: "SDXLRequest"):
    """The SDXL handle for a request: with a LoRA, routed to a replica that holds that adapter."""
    return handle.options(multiplexed_model_id=request.lora) if request.lora else handle


def _in_serve_replica() -> bool:
    try:
        serve.get_replica_context()
    except Exception:
        return False
    return True


@dataclass(eq=False)
class _BatchItem:
    prepared: _Prepared
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)  # its caller went away

    def emit(self, event: SDXLProgress) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Generated:
    """One request's share of a pipeline call, before encoding."""

    images: list[Any]
    elapsed_s: float
    batch_images: int


def load_sdxl_pipeline(config: SDXLConfig):
    from diffusers import StableDiffusionXLPipeline

    return load_diffusers_pipeline(
        StableDiffusionXLPipeline, config.model, device=config.device, dtype=config.dtype, variant=config.variant
    )


@serve.deployment(max_ongoing_requests=64)
class SDXLDeployment:
    def __init__(self, config: SDXLConfig | dict, pipeline_factory: Callable[[SDXLConfig], Any] | None = None):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.config = SDXLConfig.model_validate(config)
        self.stall_watch = StallWatch(self.config.stall_timeout_s)

        self.torch_thread, self.pipe = start_torch("sdxl", self.config, pipeline_factory or load_sdxl_pipeline)
        self.pipe.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(self.pipe)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

        self.storage = Storage(self.config.storage_root, self.config.storage_options)
        self.loras = LoraRegistry(self.storage)
        self.styles: dict[str, StylePreset] = load_styles(self.config.styles_file)
        self.batcher: ContinuousBatcher[_BatchItem, _Generated] = ContinuousBatcher(
            self._run_batch, max_size=self.config.max_batch_images, size_fn=lambda item: item.prepared.request.n,
            key_fn=lambda item: item.prepared.batch_key(), idle_wait_s=self.config.batch_wait_timeout_s)

        # LoRA adapters. Lock order: _pipe_lock (held by every pipeline call and adapter
        # load/delete) before _lora_lock (the bookkeeping below; held briefly).
        self._pipe_lock = threading.Lock()
        self._lora_lock = threading.RLock()  # re-entrant: a GC-run LoadedLora.__del__ may take it
        self._adapters: dict[str, _AdapterState] = {}
        self._pending_delete: set[str] = set()
        self._lora_loads = 0
        if not _in_serve_replica():
            self.get_lora = _LocalLoraLRU(self._load_lora, self.config.max_loras_per_replica)
        elif self.config.max_loras_per_replica != DEFAULT_MAX_LORAS_PER_REPLICA:

            async def get_lora(lora_id: str) -> LoadedLora:  # the class-level loader, with the configured size
                return await self._load_lora(lora_id)

            self.get_lora = serve.multiplexed(max_num_models_per_replica=self.config.max_loras_per_replica)(get_lora)

    # --- public methods, called through DeploymentHandles -------------------------------------

    def describe(self) -> dict:
        c = self.config
        return {
            "model": c.model_name,
            "source": c.model,
            "default_size": c.default_size,
            "min_size": c.min_size,
            "max_size": c.max_size,
            "default_steps": c.default_steps,
            "max_steps": c.max_steps,
            "default_guidance_scale": c.default_guidance_scale,
            "allowed_n": list(ALLOWED_N),
            "styles": {name: style.model_dump() for name, style in self.styles.items()},
            "max_loras_per_replica": c.max_loras_per_replica,
        }

    def loaded_loras(self) -> list[str]:
        """name:version of the adapters this replica holds (an evicted one may stay until its requests end)."""
        with self._lora_lock:
            return sorted(state.record.id for state in self._adapters.values())

    @serve.multiplexed(max_num_models_per_replica=DEFAULT_MAX_LORAS_PER_REPLICA)
    async def get_lora(self, lora_id: str) -> LoadedLora:
        """Ray Serve model multiplexing: the adapter for a model id ('name' or 'name:version'),
        loaded on a miss; the least recently used one is evicted beyond the replica's limit."""
        return await self._load_lora(lora_id)

    async def generate(self, request: SDXLRequest | dict) -> SDXLResponse:
        result = None
        async for event in self.generate_stream(request):
            result = event
        return result

    async def generate_stream(self, request: SDXLRequest | dict) -> AsyncIterator[SDXLProgress | SDXLResponse]:
        """Yields SDXLProgress per denoising step, then the SDXLResponse."""
        request = SDXLRequest.model_validate(request)
        prepared = self.check_inputs(request)
        lora = await self._lora_for(request)
        if lora is not None:
            self._use_adapter(lora.adapter_name, +1)  # no await since the load: it cannot be evicted between
        task = None
        try:
            if lora is not None:
                prepared = self.with_lora(prepared, lora)
            item = _BatchItem(prepared, asyncio.get_running_loop())
            task = asyncio.ensure_future(self.batcher.submit(item))
            generated = None
            async for event in drain_events(item.events, task):
                if isinstance(event, _Generated):
                    generated = event
                else:
                    yield event
            # encoding and storage writes run here, while the pipeline already runs the next batch
            yield await asyncio.to_thread(self._respond, prepared, generated)
        finally:
            if task is not None and not task.done():  # the caller went away (hang-up or cancel)
                item.cancelled.set()  # a running call stops once none of its requests is wanted
                task.cancel()  # a waiting request leaves the queue
            if lora is not None:
                self._use_adapter(lora.adapter_name, -1)

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")
        self.stall_watch.check()

    # --- steps ----------------------------------------------------------------------------------

    def check_inputs(self, request: SDXLRequest) -> _Prepared:
        c = self.config
        # 1. Style preset: template, negative prompt and defaults.
        style = None
        if request.style is not None:
            style = self.styles.get(request.style)
            if style is None:
                raise InvalidRequestError(
                    f"unknown style {request.style!r}; known styles: {sorted(self.styles)}", "style"
                )
        prompt = style.apply(request.prompt) if style else request.prompt
        negative = ", ".join(p for p in (style.negative_prompt if style else None, request.negative_prompt) if p)

        # 2. Numbers against the model's limits.
        steps = request.steps or (style.steps if style and style.steps else c.default_steps)
        if steps > c.max_steps:
            raise InvalidRequestError(f"steps must be at most {c.max_steps}; got {steps}", "steps")
        check_denoising_steps(request.mode, steps, request.strength)
        guidance = request.guidance_scale
        if guidance is None:
            guidance = style.guidance_scale if style and style.guidance_scale is not None else c.default_guidance_scale
        seed = request.seed if request.seed is not None else random_seed()
        if seed + request.n - 1 > MAX_SEED:
            raise InvalidRequestError(f"seed + n - 1 must be at most {MAX_SEED}", "seed")

        # 3. Input images for the edit modes.
        image = mask = None
        if request.mode != "text_to_image":
            image = self._load_input(request.image, request.image_key, "image")
        if request.mode == "inpaint":
            mask = self._load_input(request.mask, request.mask_key, "mask", mode="L")
            if mask.size != image.size:
                raise InvalidRequestError(
                    f"mask is {mask.width}x{mask.height} but image is {image.width}x{image.height}; they must match",
                    "mask",
                )

        # 4. Size: explicit, else the input image's (rounded down to a multiple of 8), else default.
        if request.width and request.height:
            width, height = request.width, request.height
        elif image is not None:
            width, height = image.width // 8 * 8, image.height // 8 * 8
        else:
            width = height = c.default_size
        check_size(width, height, min_size=c.min_size, max_size=c.max_size)
        if image is not None and image.size != (width, height):
            image = image.resize((width, height))
            mask = mask.resize((width, height)) if mask is not None else None
        return _Prepared(request, prompt, negative, width, height, steps, float(guidance), seed, image, mask)

    def with_lora(self, prepared: _Prepared, lora: LoadedLora) -> _Prepared:
        """The adapter joins the batch key, and its trigger word the prompt when absent."""
        prepared.lora = lora
        trigger = lora.record.trigger_word
        if trigger and trigger.lower() not in prepared.prompt.lower():
            prepared.prompt = f"{trigger}, {prepared.prompt}"
        return prepared

    # --- LoRA adapters ----------------------------------------------------------------------------

    async def _lora_for(self, request: SDXLRequest) -> LoadedLora | None:
        """The request's adapter, through the multiplexed loader: `request.lora`, else the
        multiplexed model id the request was routed with (`handle.options(multiplexed_model_id=...)`)."""
        model_id = serve.get_multiplexed_model_id()
        if request.lora and model_id and request.lora != model_id:
            raise InvalidRequestError(
                f"lora {request.lora!r} differs from the multiplexed model id {model_id!r} it was routed with", "lora")
        ref = request.lora or model_id
        if not ref:
            return None
        try:
            loads = self._lora_loads
            lora = await self.get_lora(ref)
            metrics.lora_cache(hit=self._lora_loads == loads)  # the multiplexer loaded nothing: a hit
            return lora
        except LoraRegistryError as exc:
            raise InvalidRequestError(f"unknown LoRA {ref!r}: {exc.message}; GET /v1/models lists registered "
                                      f"adapters", "lora") from None

    async def _load_lora(self, lora_id: str) -> LoadedLora:
        self._lora_loads += 1
        return await self.torch_thread.run(self._load_adapter, lora_id)

    def _load_adapter(self, lora_id: str) -> LoadedLora:
        """Runs in a worker thread. An adapter still in the pipeline (another model id for the same
        version, or evicted but not yet deleted) is reused, not loaded again."""
        record = self.loras.resolve(lora_id)
        name = adapter_name_for(record)
        # a handle is made only once it holds a reference: its __del__ gives one back
        if self._revive(name):
            return LoadedLora(lora_id, name, record, self._release_adapter)
        weights = self.loras.get_weights(record.name, record.version)  # storage read, outside the pipeline lock
        with self._pipe_lock:
            if self._revive(name):
                return LoadedLora(lora_id, name, record, self._release_adapter)
            self._delete_pending_locked()
            from safetensors.torch import load as load_safetensors

            if record.base_model != self.config.model:
                logger.info("LoRA %s was trained on %r; this deployment serves %r", record.id, record.base_model,
                            self.config.model)
            try:
                self.pipe.load_lora_weights(load_safetensors(weights), adapter_name=name)
            except (ValueError, KeyError, RuntimeError) as exc:
                try:  # drop whatever part of it was injected before the failure
                    self.pipe.delete_adapters(name)
                except Exception:
                    pass
                raise InvalidRequestError(f"LoRA {record.id} does not fit model {self.config.model_name!r}: {exc}",
                                          "lora") from exc
            with self._lora_lock:
                self._adapters[name] = _AdapterState(record, refs=1)
        logger.info("loaded LoRA %s as adapter %s", record.id, name)
        return LoadedLora(lora_id, name, record, self._release_adapter)

    def _revive(self, name: str) -> bool:
        with self._lora_lock:
            state = self._adapters.get(name)
            if state is None:
                return False
            state.refs += 1
            self._pending_delete.discard(name)
            return True

    def _use_adapter(self, name: str, delta: int) -> None:
        with self._lora_lock:
            self._adapters[name].in_use += delta

    def _release_adapter(self, name: str) -> None:
        """A model id holding `name` was evicted: delete the adapter now if nothing else uses it and
        no pipeline call runs; otherwise the next pipeline call (or load) deletes it."""
        with self._lora_lock:
            state = self._adapters.get(name)
            if state is None:
                return
            state.refs -= 1
            if state.refs <= 0:
                self._pending_delete.add(name)
        if self._pipe_lock.acquire(blocking=False):  # never wait here: the GC may run this on any thread
            try:
                self._delete_pending_locked()
            finally:
                self._pipe_lock.release()

    def _delete_pending_locked(self) -> None:
        """Caller holds `_pipe_lock`. Deletes released adapters that no request is using."""
        with self._lora_lock:
            names = [n for n in self._pending_delete
                     if self._adapters[n].refs <= 0 and self._adapters[n].in_use <= 0]
            if not names:
                return
            self.pipe.delete_adapters(names)
            for n in names:
                self._pending_delete.discard(n)
                logger.info("deleted LoRA adapter %s (%s)", n, self._adapters.pop(n).record.id)

    def _activate_adapter_locked(self, lora: LoadedLora | None, scale: float) -> None:
        """Caller holds `_pipe_lock`. Only this request's adapter (or none) acts in the next call."""
        if lora is not None:
            self.pipe.enable_lora()
            self.pipe.set_adapters([lora.adapter_name], [scale])
        elif self._adapters:
            self.pipe.disable_lora()

    def _load_input(self, data: bytes | None, key: str | None, param: str, mode: str = "RGB"):
        if data is None and key is not None:
            data = self.storage.get_bytes(key)
        if data is None:
            raise InvalidRequestError(f"{param} is required for this mode", param)
        return decode_image(data, param, max_pixels=self.config.max_size**2, mode=mode)

    async def _run_batch(self, items: list[_BatchItem]) -> list[_Generated | Exception]:
        """The batcher's call: compatible requests, one pipeline call in a worker thread."""
        return await self.torch_thread.run(self._run_group, items)

    def _run_group(self, group: list[_BatchItem]) -> list[_Generated | Exception]:
        token = self.stall_watch.start()
        try:
            with self._pipe_lock:  # adapters change only between pipeline calls
                self._delete_pending_locked()
                self._activate_adapter_locked(group[0].prepared.lora, group[0].prepared.request.lora_scale)
                return self._run_group_locked(group, lambda: self.stall_watch.beat(token))
        finally:
            self.stall_watch.finish(token)

    def _run_group_locked(self, group: list[_BatchItem], beat: Callable[[], None] = lambda: None
                          ) -> list[_Generated | Exception]:
        import torch

        started = time.perf_counter()
        first = group[0].prepared
        # 1. One generator per image, seeded seed, seed+1, ...: an image is reproducible alone.
        generators = [
            torch.Generator("cpu").manual_seed(item.prepared.seed + i) for item in group for i in range(item.prepared.request.n)
        ]

        # 2. Per-step progress, and a stop once every request in the call has been given up.
        def on_step_end(pipeline, step: int, timestep, callback_kwargs):
            beat()
            total = getattr(pipeline, "num_timesteps", None) or first.steps
            for item in group:
                item.emit(SDXLProgress(step=step + 1, total_steps=total))
            if all(item.cancelled.is_set() for item in group):
                pipeline._interrupt = True
            return callback_kwargs

        # 3. Run the pipeline for the mode. No negative prompt when none was given (the batch key
        # keeps requests with and without one apart): SDXL then uses zero embeddings and skips
        # two text-encoder passes.
        common = dict(
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            generator=generators,
            callback_on_step_end=on_step_end,
            width=first.width,
            height=first.height,
        )
        mode = first.request.mode
        if mode == "text_to_image":
            prompts = [item.prepared.prompt for item in group for _ in range(item.prepared.request.n)]
            negatives = [item.prepared.negative_prompt for item in group for _ in range(item.prepared.request.n)]
            output = self.pipe(prompt=prompts, negative_prompt=negatives if first.negative_prompt else None, **common)
            pipe = self.pipe
        else:
            pipe = self.img2img if mode == "image_to_image" else self.inpaint
            extra = {"mask_image": first.mask} if mode == "inpaint" else {}
            output = pipe(
                prompt=first.prompt,
                negative_prompt=first.negative_prompt or None,
                image=first.image,
                strength=first.request.strength,
                num_images_per_prompt=first.request.n,
                **extra,
                **common,
            )
        if pipe.interrupt:
            return [JobCancelledError("cancelled while generating", None)] * len(group)

        # 4. Split the images back per request; each request encodes its own, outside this call.
        elapsed = time.perf_counter() - started
        metrics.generation(self.config.model_name, first.request.mode, elapsed, first.steps, len(generators))
        images = iter(output.images)
        return [_Generated([next(images) for _ in range(item.prepared.request.n)], elapsed, len(generators))
                for item in group]

    def _respond(self, p: _Prepared, generated: _Generated) -> SDXLResponse:
        """Encode (and store, if asked) one request's images. Runs in a worker thread."""
        results = []
        for i, pixels in enumerate(generated.images):
            seed = p.seed + i
            # Lineage in PNG text chunks. Only what decides the pixels goes in: a job id would
            # make a replay's bytes differ, so it stays in the job record's output metadata.
            metadata = {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": str(seed),
                        "steps": str(p.steps), "guidance_scale": str(p.guidance_scale), "mode": p.request.mode,
                        "model": self.config.model_name, "model_id": self.config.model}
            if p.request.mode != "text_to_image":
                metadata["strength"] = str(p.request.strength)
            if p.lora is not None:
                metadata.update(lora=p.lora.record.id, lora_scale=str(p.request.lora_scale))
                if p.lora.record.sha256:
                    metadata["lora_sha256"] = p.lora.record.sha256
            png = encode_png(pixels, metadata)
            image = SDXLImage(seed=seed, width=p.width, height=p.height)
            if p.request.store:
                image.key = self.storage.put_bytes(
                    output_key(p.request.output_id or p.request.job_id or "sync", i), png, "image/png"
                )
            else:
                image.png = png
            results.append(image)
        return SDXLResponse(
            model=self.config.model_name, mode=p.request.mode, prompt=p.prompt,
            negative_prompt=p.negative_prompt, steps=p.steps, guidance_scale=p.guidance_scale,
            images=results, lora=p.lora.record.id if p.lora else None, source=self.config.model,
            lora_sha256=p.lora.record.sha256 if p.lora else None, batch_images=generated.batch_images,
            elapsed_s=generated.elapsed_s,
        )
