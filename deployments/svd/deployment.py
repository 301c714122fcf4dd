"""SVD deployment: image-to-video with Stable Video Diffusion.

The conditioning image comes as bytes or as the storage key of a stored image (an SDXL output,
say). The result is an H.264 MP4 stored at an output key, with its first frame as a PNG poster.
A replica runs one video at a time: the pipeline's scheduler keeps per-call state.

Every request is checked against the model's limits first, by the contract's one `check()`
(`deployments/svd/contract.py`), which the API and workflow validation call too.

A long video is chained from clips (graphs/video_pipelines.py): each clip stores the frame the
next one starts from (`handoff_frame`), and `join` crossfades the stored clips into one MP4.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from ray import serve

from deployments import metrics
from deployments.diffusion import DiffusionDeployment, check_cancelled, random_seed
from deployments.errors import InvalidRequestError
from deployments.media import decode_image, decode_mp4, encode_mp4, encode_png, join_clips
from deployments.svd import contract
from deployments.svd.contract import (
    SVDConfig,
    SVDJoinRequest,
    SVDJoinResponse,
    SVDLimits,
    SVDProgress,
    SVDRequest,
    SVDResponse,
)
from storage.keys import new_id, output_key


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


@serve.deployment(max_ongoing_requests=4)
class SVDDeployment(DiffusionDeployment):
    thread_name = "svd"
    config_cls = SVDConfig
    pipeline_class = "StableVideoDiffusionPipeline"

    def __init__(self, config: SVDConfig | dict, pipeline_factory: Callable[[SVDConfig], Any] | None = None):
        super().__init__(config, pipeline_factory)
        self.limits = SVDLimits.from_config(self.config, unet_num_frames=self.pipe.unet.config.num_frames)

    # --- public methods, called through DeploymentHandles -------------------------------------

    async def generate(self, request: SVDRequest | dict) -> SVDResponse:
        return await self._last(self.generate_stream(request))

    async def generate_stream(self, request: SVDRequest | dict) -> AsyncIterator[SVDProgress | SVDResponse]:
        """Yields SVDProgress per denoising step, then the SVDResponse."""
        async for event in self._stream(self.check_inputs, self._run, SVDRequest.model_validate(request)):
            yield event

    async def join(self, request: SVDJoinRequest | dict) -> SVDJoinResponse:
        """The stored clips of a chained video as one MP4, crossfaded where they overlap. CPU work
        (decode, blend, encode) in a worker thread; the pipeline stays free for the next video."""
        return await asyncio.to_thread(self._join, SVDJoinRequest.model_validate(request))

    # --- steps ----------------------------------------------------------------------------------

    def check_inputs(self, request: SVDRequest) -> _Prepared:
        from PIL import Image, ImageOps

        # 1. The model's limits (the contract's one check), then the defaults they leave.
        limits = self.limits
        contract.check(request, limits)
        width, height = contract.size_of(request, limits)
        num_frames = contract.num_frames_of(request, limits)
        min_guidance, max_guidance = contract.guidance_of(request, limits)
        decode_chunk_size = min(request.decode_chunk_size or limits.default_decode_chunk_size, num_frames)
        seed = request.seed if request.seed is not None else random_seed()

        # 2. The conditioning image: exactly one source, fitted (cropped, not stretched) to the size.
        if (request.image is None) == (request.image_key is None):
            raise InvalidRequestError("give exactly one of image and image_key", "image")
        data = request.image
        if data is None:
            data = self._input_bytes(request.image_key, "image_key")
        image = decode_image(data, "image", max_pixels=limits.max_input_pixels)
        image = ImageOps.fit(image, (width, height), Image.Resampling.LANCZOS)
        return _Prepared(request, image, width, height, num_frames, contract.fps_of(request, limits),
                         contract.steps_of(request, limits), min_guidance, max_guidance, decode_chunk_size, seed)

    def _run(self, p: _Prepared, emit: Callable[[SVDProgress], None], cancelled: threading.Event) -> SVDResponse:
        import torch

        with self._pipe_lock:
            started = time.perf_counter()
            # 1. A seeded CPU generator: the same seed gives the same video on any device.
            generator = torch.Generator("cpu").manual_seed(p.seed)
            check_cancelled(cancelled, "before it started")  # its caller went away while it waited

            # 2. Per-step progress and cooperative cancel. SVD's loop has no interrupt flag, so a
            # cancel raises out of the callback, which also skips the VAE decode.
            def on_step_end(pipeline, step: int, timestep, callback_kwargs):
                emit(SVDProgress(step=step + 1, total_steps=pipeline.num_timesteps))
                check_cancelled(cancelled, "while generating")
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
            if p.request.handoff_frame is not None:  # lossless, unlike the MP4: the next clip starts from it
                response.handoff_key = self.storage.put_bytes(
                    output_key(output_id, 1, "png"), encode_png(frames[p.request.handoff_frame]), "image/png")
        else:
            response.mp4, response.poster_png = mp4, poster
        response.elapsed_s = time.perf_counter() - started
        return response

    def _join(self, request: SVDJoinRequest) -> SVDJoinResponse:
        import numpy as np

        started = time.perf_counter()
        limits = self.limits
        # 1. The clips, each within one call's limits.
        clips = []
        for key in request.video_keys:
            frames, _ = decode_mp4(self._input_bytes(key, "video_keys"), "video_keys",
                                   max_frames=limits.max_num_frames, max_pixels=limits.max_size ** 2)
            clips.append(np.stack([np.asarray(frame) for frame in frames]))
        # 2. Crossfaded where they overlap, encoded once.
        try:
            frames = join_clips(clips, request.overlap)
        except ValueError as exc:
            raise InvalidRequestError(str(exc), "video_keys") from None
        mp4 = encode_mp4(frames, request.fps)
        height, width = frames.shape[1:3]
        response = SVDJoinResponse(model=self.config.model_name, num_frames=len(frames), fps=request.fps,
                                   width=int(width), height=int(height), elapsed_s=0.0)
        if request.store:
            output_id = request.output_id or request.job_id or new_id("video")
            response.video_key = self.storage.put_bytes(output_key(output_id, 0, "mp4"), mp4, "video/mp4")
        else:
            response.mp4 = mp4
        response.elapsed_s = time.perf_counter() - started
        return response
