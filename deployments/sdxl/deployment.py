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

Every request is checked against the model's limits first, by the contract's one `check()`
(`deployments/sdxl/contract.py`), which the API and workflow validation call too.

LoRA adapters from the registry (`storage/registry.py`) are loaded per request by name
(`lora="corgi"` or `"corgi:2"`) through Ray Serve model multiplexing: `get_lora` is a
`@serve.multiplexed` loader, so each replica keeps an LRU of adapters and the router sends a
request made with `handle.options(multiplexed_model_id=...)` to a replica that holds its adapter.
The adapters live inside the one base pipeline, managed by `SDXLAdapters`
(`deployments/sdxl/lora.py`); the base pipeline is never reloaded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from ray import serve

from deployments import metrics
from deployments.batching import ContinuousBatcher
from deployments.diffusion import DiffusionDeployment, drain_events, random_seed, unfused_qkv
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import decode_image, encode_png
from deployments.sdxl import contract
from deployments.sdxl.contract import (DEFAULT_MAX_LORAS_PER_REPLICA, SDXLConfig, SDXLImage, SDXLLimits,
                                       SDXLProgress, SDXLRequest, SDXLResponse)
from deployments.sdxl.lora import ImportedLora, LoadedLora, SDXLAdapters, instance_loader
from storage.keys import output_key
from storage.registry import LoraRegistry


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


@serve.deployment(max_ongoing_requests=64)
class SDXLDeployment(DiffusionDeployment):
    """The diffusion base (deployments/diffusion.py) loads the pipeline on the torch thread, opens
    storage and answers describe() and check_health(). Its one-request-per-call `_stream` does
    not fit here: requests share pipeline calls through the continuous batcher, and every call
    runs under the adapters' `pipe_lock` with its LoRA active."""

    thread_name = "sdxl"
    config_cls = SDXLConfig
    pipeline_class = "StableDiffusionXLPipeline"

    def __init__(self, config: SDXLConfig | dict, pipeline_factory: Callable[[SDXLConfig], Any] | None = None):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        super().__init__(config, pipeline_factory)
        self.config: SDXLConfig
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(self.pipe)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

        self.limits = SDXLLimits.from_config(self.config)  # loads the style presets
        self.batcher: ContinuousBatcher[_BatchItem, _Generated] = ContinuousBatcher(
            self._run_batch, max_size=self.config.max_batch_images, size_fn=lambda item: item.prepared.request.n,
            key_fn=lambda item: item.prepared.batch_key(), idle_wait_s=self.config.batch_wait_timeout_s)

        # LoRA adapters (deployments/sdxl/lora.py): the multiplexed loader below fills them.
        self.adapters = SDXLAdapters(self.pipe, LoraRegistry(self.storage), model=self.config.model,
                                     model_name=self.config.model_name, run=self.torch_thread.run,
                                     pipe_lock=self._pipe_lock)
        loader = instance_loader(self.adapters.load, self.config.max_loras_per_replica)
        if loader is not None:
            self.get_lora = loader

    # --- public methods, called through DeploymentHandles -------------------------------------

    def loaded_loras(self) -> list[str]:
        """name:version of the adapters this replica holds (an evicted one may stay until its requests end)."""
        return self.adapters.loaded()

    async def import_lora(self, data: bytes) -> ImportedLora:
        """An external LoRA file checked against this model's layers and converted to the format the
        registry holds (POST /v1/models); nothing stays loaded."""
        return await self.adapters.convert_import(data)

    @serve.multiplexed(max_num_models_per_replica=DEFAULT_MAX_LORAS_PER_REPLICA)
    async def get_lora(self, lora_id: str) -> LoadedLora:
        """Ray Serve model multiplexing: the adapter for a model id ('name' or 'name:version'),
        loaded on a miss; the least recently used one is evicted beyond the replica's limit."""
        return await self.adapters.load(lora_id)

    async def generate(self, request: SDXLRequest | dict) -> SDXLResponse:
        return await self._last(self.generate_stream(request))

    async def generate_stream(self, request: SDXLRequest | dict) -> AsyncIterator[SDXLProgress | SDXLResponse]:
        """Yields SDXLProgress per denoising step, then the SDXLResponse."""
        request = SDXLRequest.model_validate(request)
        prepared = self.check_inputs(request)
        lora = await self.adapters.acquire(request, self.get_lora)
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
            self.adapters.release(lora)

    # --- steps ----------------------------------------------------------------------------------

    def check_inputs(self, request: SDXLRequest) -> _Prepared:
        """The contract's check, then defaults and style applied and the input images decoded."""
        limits = self.limits
        # 1. Every limit (deployments/sdxl/contract.py); the size again below when the image gives it.
        contract.check(request, limits)

        # 2. Style preset: template, negative prompt and defaults.
        style = contract.style_of(request, limits)
        prompt = style.apply(request.prompt) if style else request.prompt
        negative = ", ".join(p for p in (style.negative_prompt if style else None, request.negative_prompt) if p)
        steps = contract.steps_of(request, limits)
        guidance = request.guidance_scale
        if guidance is None:
            guidance = style.guidance_scale if style and style.guidance_scale is not None else limits.default_guidance_scale
        # image i uses seed + i: a random seed leaves room for the request's n images
        seed = request.seed if request.seed is not None else min(random_seed(), limits.max_seed - request.n + 1)

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
        size = contract.size_of(request, limits)
        if size is None:
            size = (image.width // 8 * 8, image.height // 8 * 8)
            contract.check(request.model_copy(update={"width": size[0], "height": size[1]}), limits)
        width, height = size
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

    def _load_input(self, data: bytes | None, key: str | None, param: str, mode: str = "RGB"):
        if data is None and key is not None:
            data = self.storage.get_bytes(key)
        if data is None:
            raise InvalidRequestError(f"{param} is required for this mode", param)
        return decode_image(data, param, max_pixels=self.limits.max_input_pixels, mode=mode)

    async def _run_batch(self, items: list[_BatchItem]) -> list[_Generated | Exception]:
        """The batcher's call: compatible requests, one pipeline call in a worker thread."""
        return await self.torch_thread.run(self._run_group, items)

    def _run_group(self, group: list[_BatchItem]) -> list[_Generated | Exception]:
        token = self.stall_watch.start()
        try:
            lora = group[0].prepared.lora
            # A LoRA sits on to_q/to_k/to_v: with fused QKV projections (fast_paths.fuse_qkv) its call
            # runs on the unfused ones.
            with self.adapters.activated(lora, group[0].prepared.request.lora_scale), \
                    unfused_qkv(self.pipe, active=lora is not None):
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


def load_sdxl_pipeline(config: SDXLConfig):
    """The SDXL base pipeline as a replica loads it (scripts and benchmarks load it themselves)."""
    return SDXLDeployment.func_or_class.load_pipeline(config)
