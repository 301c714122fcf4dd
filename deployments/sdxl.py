"""SDXL deployment: text-to-image, image-to-image and inpainting, batched across requests.

One base pipeline is loaded; the img2img and inpaint pipelines share its components through
`from_pipe`, so no second copy of the weights is held. Requests that agree on size, steps and
guidance are run as one pipeline call (`@serve.batch`, batch size counted in images), each with
its own seeded generators, so an image does not depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable, Literal

from pydantic import AfterValidator, BaseModel, Field
from ray import serve

from configs.styles import StylePreset, load_styles
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import check_size, decode_image, encode_png
from deployments.runtime import (
    MAX_SEED,
    CancelCheck,
    configure_torch,
    drain_events,
    load_diffusers_pipeline,
    random_seed,
)
from storage.fs import Storage
from storage.jobs import JobStore
from storage.keys import output_key

logger = logging.getLogger("ray.serve")

ALLOWED_N = (1, 2, 4, 8)
Mode = Literal["text_to_image", "image_to_image", "inpaint"]


def _check_n(n: int) -> int:
    if n not in ALLOWED_N:
        raise ValueError(f"n must be one of {list(ALLOWED_N)}")
    return n


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be empty")
    return prompt


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
    batch_wait_timeout_s: float = 0.02
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    styles_file: str | None = None


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

    def batch_key(self) -> tuple | None:
        if self.request.mode != "text_to_image":
            return None  # each edit carries its own init image; run alone
        return (self.width, self.height, self.steps, self.guidance_scale)


@dataclass
class _BatchItem:
    prepared: _Prepared
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def emit(self, event: SDXLProgress) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def _images_in(items: list[_BatchItem]) -> int:
    return sum(item.prepared.request.n for item in items)


def load_sdxl_pipeline(config: SDXLConfig):
    from diffusers import StableDiffusionXLPipeline

    return load_diffusers_pipeline(
        StableDiffusionXLPipeline, config.model, device=config.device, dtype=config.dtype, variant=config.variant
    )


@serve.deployment(max_ongoing_requests=16)
class SDXLDeployment:
    def __init__(self, config: SDXLConfig | dict, pipeline_factory: Callable[[SDXLConfig], Any] | None = None):
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        self.config = SDXLConfig.model_validate(config)
        configure_torch(self.config.torch_num_threads, self.config.gpu_memory_fraction)

        self.pipe = (pipeline_factory or load_sdxl_pipeline)(self.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(self.pipe)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(self.pipe)
        for pipe in (self.img2img, self.inpaint):
            pipe.set_progress_bar_config(disable=True)

        self.storage = Storage(self.config.storage_root, self.config.storage_options)
        self.jobs = JobStore(self.storage)
        self.styles: dict[str, StylePreset] = load_styles(self.config.styles_file)
        self._generate_batch.set_max_batch_size(self.config.max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

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
        }

    async def generate(self, request: SDXLRequest | dict) -> SDXLResponse:
        result = None
        async for event in self.generate_stream(request):
            result = event
        return result

    async def generate_stream(self, request: SDXLRequest | dict) -> AsyncIterator[SDXLProgress | SDXLResponse]:
        """Yields SDXLProgress per denoising step, then the SDXLResponse."""
        prepared = self.check_inputs(SDXLRequest.model_validate(request))
        item = _BatchItem(prepared, asyncio.get_running_loop())
        task = asyncio.ensure_future(self._generate_batch(item))
        async for event in drain_events(item.events, task):
            if isinstance(event, BaseException):  # serve.batch hands back per-item errors as values
                raise event
            yield event

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")

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

    def _load_input(self, data: bytes | None, key: str | None, param: str, mode: str = "RGB"):
        if data is None and key is not None:
            data = self.storage.get_bytes(key)
        if data is None:
            raise InvalidRequestError(f"{param} is required for this mode", param)
        return decode_image(data, param, max_pixels=self.config.max_size**2, mode=mode)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _generate_batch(self, items: list[_BatchItem]) -> list[SDXLResponse | Exception]:
        groups: dict[Any, list[_BatchItem]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.prepared.batch_key() or ("alone", index), []).append(item)
        results: dict[int, SDXLResponse | Exception] = {}
        for group in groups.values():
            try:
                outputs = await asyncio.to_thread(self._run_group, group)
            except Exception as exc:  # a failed call fails only its own group
                outputs = [exc] * len(group)
            for item, output in zip(group, outputs):
                results[id(item)] = output
        return [results[id(item)] for item in items]

    def _run_group(self, group: list[_BatchItem]) -> list[SDXLResponse | Exception]:
        import torch

        started = time.perf_counter()
        first = group[0].prepared
        # 1. One generator per image, seeded seed, seed+1, ...: an image is reproducible alone.
        generators = [
            torch.Generator("cpu").manual_seed(item.prepared.seed + i) for item in group for i in range(item.prepared.request.n)
        ]
        cancel_requested = CancelCheck(self.jobs, [item.prepared.request.job_id for item in group])

        # 2. Per-step progress and cooperative cancel through the diffusers step callback.
        def on_step_end(pipeline, step: int, timestep, callback_kwargs):
            total = getattr(pipeline, "num_timesteps", None) or first.steps
            for item in group:
                item.emit(SDXLProgress(step=step + 1, total_steps=total))
            if cancel_requested():
                pipeline._interrupt = True
            return callback_kwargs

        # 3. Run the pipeline for the mode.
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
            output = self.pipe(prompt=prompts, negative_prompt=negatives, **common)
            pipe = self.pipe
        else:
            pipe = self.img2img if mode == "image_to_image" else self.inpaint
            extra = {"mask_image": first.mask} if mode == "inpaint" else {}
            output = pipe(
                prompt=first.prompt,
                negative_prompt=first.negative_prompt,
                image=first.image,
                strength=first.request.strength,
                num_images_per_prompt=first.request.n,
                **extra,
                **common,
            )
        if pipe.interrupt:
            return [JobCancelledError("cancelled while generating", None)] * len(group)

        # 4. Encode, store if asked, and split the images back per request.
        elapsed = time.perf_counter() - started
        images = iter(output.images)
        responses = []
        for item in group:
            p = item.prepared
            results = []
            for i in range(p.request.n):
                seed = p.seed + i
                png = encode_png(
                    next(images),
                    {"prompt": p.prompt, "negative_prompt": p.negative_prompt, "seed": str(seed),
                     "steps": str(p.steps), "model": self.config.model_name},
                )
                image = SDXLImage(seed=seed, width=p.width, height=p.height)
                if p.request.store:
                    image.key = self.storage.put_bytes(
                        output_key(p.request.output_id or p.request.job_id or "sync", i), png, "image/png"
                    )
                else:
                    image.png = png
                results.append(image)
            responses.append(
                SDXLResponse(
                    model=self.config.model_name, mode=p.request.mode, prompt=p.prompt,
                    negative_prompt=p.negative_prompt, steps=p.steps, guidance_scale=p.guidance_scale,
                    images=results, batch_images=len(generators), elapsed_s=elapsed,
                )
            )
        return responses
