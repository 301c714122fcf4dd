"""SVD deployment: image-to-video with Stable Video Diffusion.

The conditioning image comes as bytes or as the storage key of a stored image (an SDXL output,
say). The result is an H.264 MP4 stored at an output key, with its first frame as a PNG poster.
A replica runs one video at a time: the pipeline's scheduler keeps per-call state.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import BaseModel, Field, model_validator
from ray import serve

from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import check_size, decode_image, encode_mp4, encode_png
from deployments import metrics
from deployments.diffusion import (
    MAX_SEED,
    get_input_bytes,
    load_diffusers_pipeline,
    StallWatch,
    random_seed,
    start_torch,
    stream_from_thread,
)
from storage.fs import Storage
from storage.keys import new_id, output_key


class SVDConfig(BaseModel):
    model: str = Field(description="Folder or hub id of a Stable Video Diffusion pipeline (diffusers layout).")
    model_name: str = "svd"
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    default_width: int = 1024
    default_height: int = 576
    min_size: int = 64
    max_size: int = 1024
    max_input_pixels: int = Field(4096 * 4096, description="Largest conditioning image accepted, before resizing.")
    default_num_frames: int | None = Field(None, ge=1, description="Defaults to max_num_frames.")
    max_num_frames: int | None = Field(None, ge=1, description="Defaults to the UNet's num_frames (14 or 25).")
    default_fps: int = 7
    min_fps: int = Field(1, ge=1)
    max_fps: int = 60
    default_steps: int = 25
    max_steps: int = 100
    default_min_guidance_scale: float = 1.0
    default_max_guidance_scale: float = 3.0
    default_decode_chunk_size: int = Field(8, ge=1, description="Frames per VAE decode; lower saves memory.")
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    stall_timeout_s: float | None = Field(600, gt=0, description="Fail the health check when a running request "
                                                                 "makes no progress for this long.")

    @model_validator(mode="after")
    def _check_ranges(self) -> "SVDConfig":
        if not self.min_fps <= self.default_fps <= self.max_fps:
            raise ValueError("default_fps must lie between min_fps and max_fps")
        if not self.min_size <= min(self.default_width, self.default_height) <= max(
            self.default_width, self.default_height
        ) <= self.max_size:
            raise ValueError("default_width and default_height must lie between min_size and max_size")
        return self


class SVDRequest(BaseModel):
    """Exactly one of `image` and `image_key`. Frame count and fps are checked against the model's
    limits in `check_inputs`, so an out-of-range value is an InvalidRequestError naming the field."""

    image: bytes | None = None
    image_key: str | None = Field(None, description="Storage key of a stored image, e.g. an SDXL output.")
    num_frames: int | None = None
    fps: int | None = None
    motion_bucket_id: int = Field(127, ge=0, le=255)
    noise_aug_strength: float = Field(0.02, ge=0, le=1)
    decode_chunk_size: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, ge=1)
    min_guidance_scale: float | None = Field(None, ge=0, le=30)
    max_guidance_scale: float | None = Field(None, ge=0, le=30)
    job_id: str | None = None
    output_id: str | None = None
    store: bool = False


class SVDProgress(BaseModel):
    step: int
    total_steps: int


class SVDResponse(BaseModel):
    model: str
    video_key: str | None = None
    poster_key: str | None = None
    mp4: bytes | None = None
    poster_png: bytes | None = None
    num_frames: int
    fps: int
    width: int
    height: int
    seed: int
    steps: int
    motion_bucket_id: int
    noise_aug_strength: float
    elapsed_s: float


@dataclass
class _Prepared:
    """A request after `check_inputs`: defaults applied, image decoded and fitted to the size."""

    request: SVDRequest
    image: Any
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    decode_chunk_size: int
    seed: int


def load_svd_pipeline(config: SVDConfig):
    from diffusers import StableVideoDiffusionPipeline

    return load_diffusers_pipeline(
        StableVideoDiffusionPipeline, config.model, device=config.device, dtype=config.dtype, variant=config.variant
    )


@serve.deployment(max_ongoing_requests=4)
class SVDDeployment:
    def __init__(self, config: SVDConfig | dict, pipeline_factory: Callable[[SVDConfig], Any] | None = None):
        self.config = SVDConfig.model_validate(config)
        self.stall_watch = StallWatch(self.config.stall_timeout_s)

        self.torch_thread, self.pipe = start_torch("svd", self.config, pipeline_factory or load_svd_pipeline)
        self.pipe.set_progress_bar_config(disable=True)
        self.max_num_frames = self.config.max_num_frames or self.pipe.unet.config.num_frames
        self.default_num_frames = min(self.config.default_num_frames or self.max_num_frames, self.max_num_frames)
        self._lock = threading.Lock()

        self.storage = Storage(self.config.storage_root, self.config.storage_options)

    # --- public methods, called through DeploymentHandles -------------------------------------

    def describe(self) -> dict:
        c = self.config
        return {
            "model": c.model_name,
            "source": c.model,
            "default_width": c.default_width,
            "default_height": c.default_height,
            "min_size": c.min_size,
            "max_size": c.max_size,
            "size_multiple": 8,
            "default_num_frames": self.default_num_frames,
            "max_num_frames": self.max_num_frames,
            "default_fps": c.default_fps,
            "min_fps": c.min_fps,
            "max_fps": c.max_fps,
            "default_steps": c.default_steps,
            "max_steps": c.max_steps,
            "default_decode_chunk_size": c.default_decode_chunk_size,
            "motion_bucket_id": [0, 255],
            "noise_aug_strength": [0.0, 1.0],
        }

    async def generate(self, request: SVDRequest | dict) -> SVDResponse:
        result = None
        async for event in self.generate_stream(request):
            result = event
        return result

    async def generate_stream(self, request: SVDRequest | dict) -> AsyncIterator[SVDProgress | SVDResponse]:
        """Yields SVDProgress per denoising step, then the SVDResponse."""
        request = SVDRequest.model_validate(request)
        prepared = await asyncio.to_thread(self.check_inputs, request)  # may read storage
        async for event in stream_from_thread(lambda emit, cancelled: self._run(prepared, emit, cancelled),
                                              self.stall_watch, self.torch_thread.executor):
            yield event

    def check_health(self) -> None:
        if self.pipe is None:
            raise RuntimeError("pipeline not loaded")
        self.stall_watch.check()

    # --- steps ----------------------------------------------------------------------------------

    def check_inputs(self, request: SVDRequest) -> _Prepared:
        from PIL import Image, ImageOps

        c = self.config
        # 1. Numbers against the model's limits.
        num_frames = request.num_frames if request.num_frames is not None else self.default_num_frames
        if not 1 <= num_frames <= self.max_num_frames:
            raise InvalidRequestError(
                f"num_frames must be between 1 and {self.max_num_frames}; got {num_frames}", "num_frames"
            )
        fps = request.fps if request.fps is not None else c.default_fps
        if not c.min_fps <= fps <= c.max_fps:
            raise InvalidRequestError(f"fps must be between {c.min_fps} and {c.max_fps}; got {fps}", "fps")
        steps = request.steps or c.default_steps
        if steps > c.max_steps:
            raise InvalidRequestError(f"steps must be at most {c.max_steps}; got {steps}", "steps")
        min_guidance, max_guidance = request.min_guidance_scale, request.max_guidance_scale
        min_guidance = c.default_min_guidance_scale if min_guidance is None else min_guidance
        max_guidance = c.default_max_guidance_scale if max_guidance is None else max_guidance
        if min_guidance > max_guidance:
            raise InvalidRequestError(
                f"min_guidance_scale ({min_guidance}) must not exceed max_guidance_scale ({max_guidance})",
                "min_guidance_scale",
            )
        width, height = request.width or c.default_width, request.height or c.default_height
        check_size(width, height, min_size=c.min_size, max_size=c.max_size)
        decode_chunk_size = min(request.decode_chunk_size or c.default_decode_chunk_size, num_frames)
        seed = request.seed if request.seed is not None else random_seed()

        # 2. The conditioning image: exactly one source, fitted (cropped, not stretched) to the size.
        if (request.image is None) == (request.image_key is None):
            raise InvalidRequestError("give exactly one of image and image_key", "image")
        data = request.image
        if data is None:
            data = get_input_bytes(self.storage, request.image_key, "image_key")
        image = decode_image(data, "image", max_pixels=c.max_input_pixels)
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
        return _Prepared(request, image, width, height, num_frames, fps, steps, float(min_guidance),
                         float(max_guidance), decode_chunk_size, seed)

    def _run(self, p: _Prepared, emit: Callable[[SVDProgress], None], cancelled: threading.Event) -> SVDResponse:
        import torch

        with self._lock:
            started = time.perf_counter()
            # 1. A seeded CPU generator: the same seed gives the same video on any device.
            generator = torch.Generator("cpu").manual_seed(p.seed)
            if cancelled.is_set():  # its caller went away while it waited for the pipeline
                raise JobCancelledError("cancelled before it started", None)

            # 2. Per-step progress and cooperative cancel. SVD's loop has no interrupt flag, so a
            # cancel raises out of the callback, which also skips the VAE decode.
            def on_step_end(pipeline, step: int, timestep, callback_kwargs):
                emit(SVDProgress(step=step + 1, total_steps=pipeline.num_timesteps))
                if cancelled.is_set():
                    raise JobCancelledError("cancelled while generating", None)
                return callback_kwargs

            # 3. Denoise and decode the frames.
            frames = self.pipe(
                p.image,
                height=p.height,
                width=p.width,
                num_frames=p.num_frames,
                num_inference_steps=p.steps,
                min_guidance_scale=p.min_guidance_scale,
                max_guidance_scale=p.max_guidance_scale,
                fps=p.fps,
                motion_bucket_id=p.request.motion_bucket_id,
                noise_aug_strength=p.request.noise_aug_strength,
                decode_chunk_size=p.decode_chunk_size,
                generator=generator,
                output_type="pil",
                callback_on_step_end=on_step_end,
            ).frames[0]
            # One video per call: steps/s is the pipeline's, each step denoising every frame at once.
            metrics.generation(self.config.model_name, "image_to_video", time.perf_counter() - started, p.steps, 1)

        # 4. Encode the MP4 and the poster (first frame), and store them if asked.
        mp4 = encode_mp4(frames, p.fps)
        poster = encode_png(frames[0], {"seed": str(p.seed), "steps": str(p.steps), "fps": str(p.fps),
                                        "num_frames": str(p.num_frames), "model": self.config.model_name})
        response = SVDResponse(
            model=self.config.model_name, num_frames=len(frames), fps=p.fps, width=p.width, height=p.height,
            seed=p.seed, steps=p.steps, motion_bucket_id=p.request.motion_bucket_id,
            noise_aug_strength=p.request.noise_aug_strength, elapsed_s=0.0,
        )
        if p.request.store:
            output_id = p.request.output_id or p.request.job_id or new_id("video")
            response.video_key = self.storage.put_bytes(output_key(output_id, 0, "mp4"), mp4, "video/mp4")
            response.poster_key = self.storage.put_bytes(output_key(output_id, 0, "png"), poster, "image/png")
        else:
            response.mp4, response.poster_png = mp4, poster
        response.elapsed_s = time.perf_counter() - started
        return response
