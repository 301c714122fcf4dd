"""Upscaler deployment: the Stable Diffusion x4 upscaler, on images and on video frames.

Output is exactly 4x each side. The diffusion runs at the input's resolution and the VAE
decodes 4x larger, so memory grows fast with size: inputs larger than `tile_size` are cut into
overlapping tiles, upscaled, and blended back with feathered (linear ramp) weights, and the VAE
decodes in tiles too. Tiles and frames of one request share the pipeline calls, several per
call, each with its own generator seeded with the request's seed: every tile and frame gets the
same noise, which keeps video frames consistent with each other.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Literal

import numpy as np
from ray import serve

from deployments import metrics
from deployments.diffusion import DiffusionDeployment, check_cancelled, random_seed
from deployments.errors import InvalidRequestError
from deployments.media import decode_image, decode_mp4, encode_mp4, encode_png
from deployments.upscaler import contract
from deployments.upscaler.contract import (UpscaleMedia, UpscaleProgress, UpscaleRequest, UpscalerConfig,
                                           UpscaleResponse, UpscalerLimits)
from storage.keys import new_id, output_key

Box = tuple[int, int, int, int]  # left, top, right, bottom (input pixels)


@dataclass
class _Prepared:
    """A request after `check_inputs`: the source decoded to frames, defaults applied."""

    request: UpscaleRequest
    media: Literal["image", "video"]
    frames: list[Any]  # PIL images, all one size
    fps: float | None
    steps: int
    noise_level: int
    seed: int


# --- tiling ------------------------------------------------------------------------------------


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` pixels covering `length`, neighbours sharing at least `overlap`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def tile_boxes(width: int, height: int, tile: int, overlap: int) -> list[Box]:
    return [
        (x, y, min(x + tile, width), min(y + tile, height))
        for y in tile_starts(height, tile, overlap)
        for x in tile_starts(width, tile, overlap)
    ]


def _ramp(length: int, ramp_in: int, ramp_out: int) -> np.ndarray:
    weights = np.ones(length, dtype=np.float32)
    if ramp_in:  # half-pixel offsets: no weight is 0, so every pixel has a defined blend
        weights[:ramp_in] = (np.arange(ramp_in, dtype=np.float32) + 0.5) / ramp_in
    if ramp_out:
        weights[length - ramp_out:] = np.minimum(
            weights[length - ramp_out:], ((np.arange(ramp_out, dtype=np.float32) + 0.5) / ramp_out)[::-1]
        )
    return weights


def feather_weights(box: Box, width: int, height: int, overlap: int, scale: int) -> np.ndarray:
    """(h, w, 1) blend weights of an upscaled tile: linear ramps over the overlap on the sides
    that meet another tile, flat on the image's own borders."""
    left, top, right, bottom = box
    ramp = overlap * scale
    wx = _ramp((right - left) * scale, ramp if left > 0 else 0, ramp if right < width else 0)
    wy = _ramp((bottom - top) * scale, ramp if top > 0 else 0, ramp if bottom < height else 0)
    return (wy[:, None] * wx[None, :])[:, :, None]


class TiledCanvas:
    """Accumulates weighted upscaled tiles of one image and divides by the weights at the end."""

    def __init__(self, width: int, height: int, scale: int):
        self.scale = scale
        self.sum = np.zeros((height * scale, width * scale, 3), dtype=np.float32)
        self.weight = np.zeros((height * scale, width * scale, 1), dtype=np.float32)

    def add(self, tile: np.ndarray, box: Box, weights: np.ndarray) -> None:
        left, top, right, bottom = (v * self.scale for v in box)
        self.sum[top:bottom, left:right] += tile.astype(np.float32) * weights
        self.weight[top:bottom, left:right] += weights

    def result(self) -> np.ndarray:
        return np.clip(np.round(self.sum / self.weight), 0, 255).astype(np.uint8)


@serve.deployment(max_ongoing_requests=8)
class UpscalerDeployment(DiffusionDeployment):
    thread_name = "upscaler"
    config_cls = UpscalerConfig
    pipeline_class = "StableDiffusionUpscalePipeline"

    def __init__(self, config: UpscalerConfig | dict, pipeline_factory: Callable[[UpscalerConfig], Any] | None = None):
        super().__init__(config, pipeline_factory)  # VAE tiling (the 4x decode's memory peak): fast_paths
        # The VAE's factor is the upscale factor; the pipeline also rounds inputs down to a
        # multiple of it, so inputs and tiles are padded to one to keep the output exactly 4x.
        self.limits = UpscalerLimits.from_config(self.config, scale=self.pipe.vae_scale_factor,
                                                 max_noise_level=int(self.pipe.config.max_noise_level))

    # --- public methods, called through DeploymentHandles -------------------------------------

    async def upscale(self, request: UpscaleRequest | dict) -> UpscaleResponse:
        return await self._last(self.upscale_stream(request))

    async def upscale_stream(self, request: UpscaleRequest | dict) -> AsyncIterator[UpscaleProgress | UpscaleResponse]:
        """Yields UpscaleProgress per denoising step of every pipeline call, then the UpscaleResponse."""
        async for event in self._stream(self.check_inputs, self._run, UpscaleRequest.model_validate(request)):
            yield event

    # --- steps ----------------------------------------------------------------------------------

    def check_inputs(self, request: UpscaleRequest) -> _Prepared:
        # 1. The numbers against the model's limits (the contract's one check).
        limits = self.limits
        contract.check(request, limits)
        seed = request.seed if request.seed is not None else random_seed()

        # 2. Exactly one source, decoded with its pixel and frame limits checked on the way.
        sources = {name: getattr(request, name) for name in ("image", "image_key", "video", "video_key")}
        given = [name for name, value in sources.items() if value is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                f"give exactly one of image, image_key, video and video_key; got {given or 'none'}",
                "video" if given and all(name.startswith("video") for name in given) else "image",
            )
        source = given[0]
        data = sources[source]
        if source.endswith("_key"):
            data = self._input_bytes(data, source)
        media: Literal["image", "video"] = "video" if source.startswith("video") else "image"
        fps = None
        if media == "image":
            frames = [decode_image(data, "image", max_pixels=limits.max_input_pixels)]
        else:
            frames, fps = decode_mp4(data, "video", max_frames=limits.max_frames, max_pixels=limits.max_input_pixels)

        # 3. Size: too small to be worth it, or too large for the memory budget.
        width, height = frames[0].size
        contract.check(request, limits, UpscaleMedia(width=width, height=height, param=media, what=media,
                                                     num_frames=len(frames) if media == "video" else None))
        return _Prepared(request, media, frames, fps, contract.steps_of(request, limits),
                         contract.noise_level_of(request, limits), seed)

    def _run(self, p: _Prepared, emit: Callable[[UpscaleProgress], None],
             cancelled: threading.Event) -> UpscaleResponse:
        import torch
        from PIL import Image

        c = self.config
        scale = self.limits.scale
        width, height = p.frames[0].size
        with self._pipe_lock:
            started = time.perf_counter()
            check_cancelled(cancelled, "before it started")  # its caller went away while it waited

            # 1. Pad to a multiple of the scale (edge pixels repeated), then cut into tiles.
            padded_w, padded_h = -(-width // scale) * scale, -(-height // scale) * scale
            overlap = c.tile_overlap
            boxes = tile_boxes(padded_w, padded_h, self.limits.tile_size, overlap)
            weights = [feather_weights(box, padded_w, padded_h, overlap, scale) for box in boxes]
            units = [(frame, tile) for frame in range(len(p.frames)) for tile in range(len(boxes))]
            calls = [units[i:i + c.max_batch_images] for i in range(0, len(units), c.max_batch_images)]
            total_steps = len(calls) * p.steps
            done_calls = 0

            # 2. Progress and cooperative cancel. This pipeline has neither callback_on_step_end
            # nor an interrupt flag: its legacy per-step callback is the hook, and cancel raises.
            def on_step(step: int, timestep, latents) -> None:
                emit(UpscaleProgress(step=done_calls * p.steps + step + 1, total_steps=total_steps))
                check_cancelled(cancelled, "while upscaling")

            # 3. Upscale the tiles of every frame, several per call, each with the same seed.
            # Guidance only matters with a prompt: an empty one is also the negative prompt.
            guidance_scale = c.guidance_scale if p.request.prompt else 1.0
            padded: dict[int, Any] = {}
            canvases: dict[int, TiledCanvas] = {}
            remaining = {frame: len(boxes) for frame in range(len(p.frames))}
            frames_out: list[np.ndarray] = [None] * len(p.frames)
            for call in calls:
                crops = []
                for frame, tile in call:
                    if frame not in padded:
                        padded[frame] = _pad_to(p.frames[frame], padded_w, padded_h)
                    crops.append(padded[frame].crop(boxes[tile]))
                images = self.pipe(
                    prompt=[p.request.prompt] * len(crops),
                    image=crops,
                    num_inference_steps=p.steps,
                    guidance_scale=guidance_scale,
                    noise_level=p.noise_level,
                    generator=[torch.Generator("cpu").manual_seed(p.seed) for _ in crops],
                    output_type="np",
                    callback=on_step,
                    callback_steps=1,
                ).images
                done_calls += 1

                # 4. Blend each tile into its frame; a frame is finished once all its tiles are in.
                for (frame, tile), image in zip(call, images):
                    canvas = canvases.setdefault(frame, TiledCanvas(padded_w, padded_h, scale))
                    canvas.add(image * 255.0, boxes[tile], weights[tile])
                    remaining[frame] -= 1
                    if not remaining[frame]:
                        frames_out[frame] = canvases.pop(frame).result()[: height * scale, : width * scale]
                        padded.pop(frame, None)
            # Every tile of every frame is one image denoised for p.steps steps.
            metrics.generation(c.model_name, f"upscale_{p.media}", time.perf_counter() - started, p.steps,
                               len(units))

        # 5. Encode, and store if asked.
        response = UpscaleResponse(
            model=c.model_name, media=p.media, width=width * scale, height=height * scale, tiles=len(boxes),
            seed=p.seed, steps=p.steps, noise_level=p.noise_level, elapsed_s=0.0,
        )
        if p.media == "image":
            data = encode_png(Image.fromarray(frames_out[0]), {"seed": str(p.seed), "steps": str(p.steps),
                                                                "model": c.model_name, "prompt": p.request.prompt})
            ext, content_type, field = "png", "image/png", "png"
        else:
            data = encode_mp4(np.stack(frames_out), p.fps)
            response.num_frames, response.fps = len(frames_out), p.fps
            ext, content_type, field = "mp4", "video/mp4", "mp4"
        if p.request.store:
            output_id = p.request.output_id or p.request.job_id or new_id("upscale")
            response.key = self.storage.put_bytes(output_key(output_id, 0, ext), data, content_type)
        else:
            setattr(response, field, data)
        response.elapsed_s = time.perf_counter() - started
        return response


def _pad_to(image, width: int, height: int):
    """`image` grown to width x height by repeating its last column and row."""
    if image.size == (width, height):
        return image
    from PIL import Image

    array = np.asarray(image)
    array = np.pad(array, ((0, height - array.shape[0]), (0, width - array.shape[1]), (0, 0)), mode="edge")
    return Image.fromarray(array)
