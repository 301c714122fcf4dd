"""The upscaler deployment class without Ray: limits, exact 4x, tiling and blending, video, progress, cancel.

The tiny model's output is noise, so tile blending is checked exactly with a stand-in pipeline
(a nearest-neighbour 4x whose tiles can be told apart), and only loosely on the tiny model.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from local.tiny_models import ensure_tiny_models
from deployments import metrics
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import decode_mp4, encode_mp4
from api.images.protocol import ImageUpscaleRequest
from deployments.upscaler.contract import UpscaleProgress, UpscaleRequest, UpscaleResponse
from deployments.upscaler.deployment import UpscalerDeployment, tile_boxes
from tests.streams import PipelineSpy, leave_after_first_step

REPO = Path(__file__).resolve().parents[2]
CONFIG = {"min_input_size": 16, "max_input_size": 256, "tile_size": 32, "tile_overlap": 8, "max_frames": 6,
          "default_steps": 2, "max_steps": 50, "max_batch_images": 4, "torch_num_threads": 1}


@pytest.fixture(scope="module")
def upscaler(tmp_path_factory):
    model = ensure_tiny_models(REPO / "models" / "tiny")["upscaler"]
    cls = UpscalerDeployment.func_or_class
    return cls({"model": str(model), "storage_root": str(tmp_path_factory.mktemp("storage")), **CONFIG})


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)


def gradient(width: int, height: int) -> np.ndarray:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return np.stack([x, y, (x + y) / 2], -1).astype(np.uint8)


def pixels_of(response: UpscaleResponse) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.png)), dtype=np.int16)


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(deployment, request: UpscaleRequest) -> list:
    return [event async for event in deployment.upscale_stream(request)]


# --- input checks --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"image": png(noise(8, 32))}, "image"),  # too small
    ({"image": png(noise(300, 20))}, "image"),  # too large
    ({"image": b"not an image"}, "image"),
    ({"image": png(noise(32, 32)), "video_key": "inputs/x.mp4"}, "image"),  # two sources
    ({}, "image"),  # none
    ({"image_key": "inputs/missing.png"}, "image_key"),
    ({"video": encode_mp4(noise(16, 16)[None].repeat(7, 0), 8)}, "video"),  # 7 frames > max_frames 6
    ({"video": encode_mp4(noise(8, 8)[None].repeat(2, 0), 8)}, "video"),  # frames too small
    ({"image": png(noise(32, 32)), "steps": 51}, "steps"),
    ({"image": png(noise(32, 32)), "noise_level": 351}, "noise_level"),  # the model's max_noise_level
])
def test_check_inputs_names_the_field(upscaler, fields, param):
    with pytest.raises(InvalidRequestError) as raised:
        upscaler.check_inputs(UpscaleRequest(**fields))
    assert raised.value.param == param


@pytest.mark.parametrize("model", [UpscaleRequest, ImageUpscaleRequest])
@pytest.mark.parametrize("field, value", [
    ("steps", float("inf")), ("steps", "inf"), ("steps", 1e308), ("noise_level", float("nan")),
    ("noise_level", "nan"), ("seed", float("inf")),
])
def test_requests_refuse_inf_and_nan(model, field, value):
    """Every number of an upscale request is an int: pydantic refuses these, so the ingress
    answers 400 naming the field."""
    with pytest.raises(ValidationError) as raised:
        model.model_validate({field: value})
    assert raised.value.errors()[0]["loc"] == (field,)


def test_describe(upscaler):
    info = upscaler.describe()
    assert info["scale"] == 4 and info["max_noise_level"] == 350
    assert (info["min_input_size"], info["max_input_size"], info["tile_size"]) == (16, 256, 32)


# --- the tiny model ------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height", [(16, 16), (30, 22)])
def test_untiled_output_is_exactly_4x(upscaler, width, height):
    response = run(upscaler.upscale(UpscaleRequest(image=png(noise(width, height)), seed=1)))
    assert response.tiles == 1 and response.media == "image"
    assert (response.width, response.height) == (4 * width, 4 * height)
    assert Image.open(io.BytesIO(response.png)).size == (4 * width, 4 * height)


def test_tiled_output_is_4x_deterministic_and_without_wild_seams(upscaler):
    request = UpscaleRequest(image=png(gradient(48, 40)), seed=5)
    events = run(collect(upscaler, request))
    response = events[-1]
    assert response.tiles == 4 and (response.width, response.height) == (192, 160)
    # Four 32x32 tiles fit one call: one call's steps.
    assert [(e.step, e.total_steps) for e in events[:-1]] == [(1, 2), (2, 2)]

    out = pixels_of(response)
    assert out.shape == (160, 192, 3)
    assert np.array_equal(out, pixels_of(run(upscaler.upscale(request))))
    assert not np.array_equal(out, pixels_of(run(upscaler.upscale(request.model_copy(update={"seed": 6})))))

    # Tile edges (input x 16 and 32, y 8 and 32, times 4) are no rougher than the rest.
    dx = np.abs(np.diff(out, axis=1)).mean(axis=(0, 2))
    dy = np.abs(np.diff(out, axis=0)).mean(axis=(1, 2))
    for diffs, edges in ((dx, (63, 127)), (dy, (31, 127))):
        assert max(diffs[e] for e in edges) < 2 * np.median(diffs) + 5


def test_progress_counts_calls_times_steps(upscaler):
    # 64x64 in 32px tiles, overlap 8: 3x3 tiles, 4 per call -> 3 calls of 2 steps.
    events = run(collect(upscaler, UpscaleRequest(image=png(noise(64, 64)), seed=1)))
    assert [e.step for e in events[:-1]] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(e, UpscaleProgress) and e.total_steps == 6 for e in events[:-1])
    assert events[-1].tiles == 9 and (events[-1].width, events[-1].height) == (256, 256)


def test_video_keeps_frames_and_fps_at_4x(upscaler):
    a, b = noise(24, 24, seed=1), noise(24, 24, seed=2)
    response = run(upscaler.upscale(UpscaleRequest(video=encode_mp4(np.stack([a, a, b, b]), 10), seed=3)))
    assert response.media == "video" and response.png is None
    frames, fps = decode_mp4(response.mp4)
    assert len(frames) == response.num_frames == 4 and fps == response.fps == 10.0
    assert all(frame.size == (96, 96) for frame in frames)
    out = np.stack([np.asarray(frame, dtype=np.int16) for frame in frames])
    # The same seed for every frame: equal frames stay equal, so a still scene does not flicker.
    assert np.abs(out[0] - out[1]).mean() < 3 < np.abs(out[0] - out[2]).mean()


def test_stored_video_in_stored_video_out(upscaler):
    upscaler.storage.put_bytes("inputs/clip.mp4", encode_mp4(noise(16, 16)[None].repeat(2, 0), 12))
    response = run(upscaler.upscale(UpscaleRequest(video_key="inputs/clip.mp4", store=True, output_id="up_test")))
    assert response.mp4 is None and response.key.endswith("/up_test/0.mp4")
    frames, fps = decode_mp4(upscaler.storage.get_bytes(response.key))
    assert len(frames) == 2 and frames[0].size == (64, 64) and fps == 12.0


def test_a_caller_that_goes_away_stops_the_run(upscaler, monkeypatch):
    """A hang-up or a job cancel (the DeploymentHandle call is cancelled) stops the pipeline at its
    next step; the replica reads no cancel marker."""
    spy = PipelineSpy(upscaler.pipe)
    monkeypatch.setattr(upscaler, "pipe", spy)

    async def go():
        stream = upscaler.upscale_stream(UpscaleRequest(image=png(noise(32, 32)), steps=20))
        await leave_after_first_step(stream, UpscaleProgress)
        assert await asyncio.to_thread(spy.finished.wait, 60)

    run(go())
    assert isinstance(spy.raised, JobCancelledError) and 1 <= spy.steps < 20


# --- tiling and blending, exactly, with a stand-in pipeline ---------------------------------------


class NearestX4Pipeline:
    """Nearest-neighbour 4x in the pipeline's calling convention; `offsets` add a per-call value."""

    vae_scale_factor = 4
    config = SimpleNamespace(max_noise_level=350)

    def __init__(self, offsets=None):
        self.vae = SimpleNamespace(tiling=False, enable_tiling=lambda: setattr(self.vae, "tiling", True))
        self.offsets = offsets
        self.calls: list[list[tuple[int, int]]] = []
        self.tile_count = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, image, num_inference_steps, generator, output_type, callback, callback_steps, **kwargs):
        assert len(prompt) == len(image) == len(generator) and output_type == "np"
        assert all(crop.width % 4 == 0 and crop.height % 4 == 0 for crop in image)
        self.calls.append([crop.size for crop in image])
        for step in range(num_inference_steps):
            callback(step, 0, None)
        out = []
        for crop in image:
            big = np.asarray(crop, dtype=np.float32).repeat(4, 0).repeat(4, 1) / 255
            if self.offsets is not None:
                big = big + self.offsets[self.tile_count % len(self.offsets)] / 255
                self.tile_count += 1
            out.append(big)
        return SimpleNamespace(images=np.stack(out))


def fake_upscaler(tmp_path, pipe) -> UpscalerDeployment:
    cls = UpscalerDeployment.func_or_class
    return cls({"model": "stand-in", "storage_root": str(tmp_path), **CONFIG}, pipeline_factory=lambda config: pipe)


def test_tile_boxes_cover_with_overlap():
    boxes = tile_boxes(72, 56, 32, 8)
    assert sorted({b[0] for b in boxes}) == [0, 24, 40] and sorted({b[1] for b in boxes}) == [0, 24]
    assert all(b[2] - b[0] == 32 and b[3] - b[1] == 32 for b in boxes)
    assert tile_boxes(20, 12, 32, 8) == [(0, 0, 20, 12)]


def test_tiles_reassemble_exactly(tmp_path):
    pipe = NearestX4Pipeline()
    deployment = fake_upscaler(tmp_path, pipe)
    assert pipe.vae.tiling  # the VAE decodes in tiles too
    source = gradient(70, 54)  # not a multiple of 4: padded, then cropped back
    response = run(deployment.upscale(UpscaleRequest(image=png(source), steps=3)))
    assert response.tiles == 6 and (response.width, response.height) == (280, 216)
    assert [len(call) for call in pipe.calls] == [4, 2]  # max_batch_images per call
    assert all(size == (32, 32) for call in pipe.calls for size in call)
    expected = source.astype(np.int16).repeat(4, 0).repeat(4, 1)
    assert np.abs(pixels_of(response) - expected).max() <= 1


def test_feathered_blend_has_no_seam(tmp_path):
    # Tiles come back 60 levels apart: a hard paste would jump by 60 at each tile edge;
    # the linear ramp over 8 * 4 output pixels spreads that to about 2 levels per pixel.
    deployment = fake_upscaler(tmp_path, NearestX4Pipeline(offsets=[0, 60, 20, 40]))
    source = np.full((40, 48, 3), 100, dtype=np.uint8)
    out = pixels_of(run(deployment.upscale(UpscaleRequest(image=png(source)))))
    assert out.min() >= 100 and out.max() <= 160
    assert np.abs(np.diff(out, axis=1)).max() <= 3 and np.abs(np.diff(out, axis=0)).max() <= 3
    assert out.max() - out.min() >= 30  # the offsets did arrive


def test_video_frames_share_calls(tmp_path):
    pipe = NearestX4Pipeline()
    deployment = fake_upscaler(tmp_path, pipe)
    video = encode_mp4(gradient(24, 16)[None].repeat(5, 0), 6)
    events = run(collect(deployment, UpscaleRequest(video=video, steps=2)))
    assert [len(call) for call in pipe.calls] == [4, 1]
    assert [e.step for e in events[:-1]] == [1, 2, 3, 4] and events[-1].num_frames == 5


def test_each_run_records_latency_and_steps_per_tile(tmp_path, monkeypatch):
    recorded = []
    monkeypatch.setattr(metrics, "generation", lambda *args: recorded.append(args))
    deployment = fake_upscaler(tmp_path, NearestX4Pipeline())
    run(deployment.upscale(UpscaleRequest(image=png(gradient(70, 54)), steps=3)))  # 6 tiles
    run(deployment.upscale(UpscaleRequest(video=encode_mp4(gradient(24, 16)[None].repeat(5, 0), 6), steps=2)))
    assert [args[:2] + args[3:] for args in recorded] == [
        ("upscaler", "upscale_image", 3, 6), ("upscaler", "upscale_video", 2, 5)]
    assert all(args[2] > 0 for args in recorded)
