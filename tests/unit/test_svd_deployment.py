"""The SVD deployment class without Ray, on the tiny model: limits, MP4 output, seeds, progress, cancel."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from local.tiny_models import ensure_tiny_models
from deployments import metrics
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import decode_mp4
from api.videos.protocol import VideoCreateRequest
from deployments.svd import contract
from deployments.svd.contract import SVDProgress, SVDRequest, SVDResponse
from deployments.svd.deployment import SVDDeployment
from tests.streams import PipelineSpy, leave_after_first_step

REPO = Path(__file__).resolve().parents[2]
# Guidance 1 skips the unconditional pass, halving each step; 2 steps are enough to test the plumbing.
FAST = {"steps": 2, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0}


@pytest.fixture(scope="module")
def svd(tmp_path_factory):
    model = ensure_tiny_models(REPO / "models" / "tiny")["svd"]
    cls = SVDDeployment.func_or_class
    return cls({"model": str(model), "storage_root": str(tmp_path_factory.mktemp("storage")),
                "default_width": 64, "default_height": 64, "min_size": 32, "max_size": 256,
                "default_steps": 3, "max_steps": 50, "torch_num_threads": 1})


@pytest.fixture(scope="module")
def image() -> bytes:
    pixels = (np.random.default_rng(0).random((80, 100, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def run(coroutine):
    return asyncio.run(coroutine)


async def collect(svd, request: SVDRequest) -> list:
    return [event async for event in svd.generate_stream(request)]


def frames_of(mp4: bytes) -> np.ndarray:
    frames, _ = decode_mp4(mp4)
    return np.stack([np.asarray(frame) for frame in frames]).astype(np.int16)


def test_describe_takes_the_frame_limit_from_the_unet(svd):
    info = svd.describe()
    assert info["max_num_frames"] == 4 == info["default_num_frames"]  # the tiny UNet's num_frames
    assert (info["min_fps"], info["max_fps"]) == (1, 60)
    assert (info["default_width"], info["default_height"]) == (64, 64)


@pytest.mark.parametrize("fields, param", [
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 5}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"fps": 61}, "fps"),
    ({"steps": 51}, "steps"),
    ({"width": 60, "height": 64}, "size"),
    ({"width": 512, "height": 512}, "size"),
    ({"min_guidance_scale": 3.0, "max_guidance_scale": 2.0}, "min_guidance_scale"),
    ({"image_key": "inputs/x.png"}, "image"),  # both sources
    ({"image": None}, "image"),  # neither
    ({"image": b"not an image"}, "image"),
    ({"image": None, "image_key": "inputs/missing.png"}, "image_key"),
])
def test_check_inputs_names_the_field(svd, image, fields, param):
    with pytest.raises(InvalidRequestError) as raised:
        svd.check_inputs(SVDRequest(**{"image": image, **fields}))
    assert raised.value.param == param


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("fields, param", [
    ({"noise_aug_strength": NAN}, "noise_aug_strength"),
    ({"noise_aug_strength": INF}, "noise_aug_strength"),
    ({"min_guidance_scale": NAN}, "min_guidance_scale"),
    ({"max_guidance_scale": INF}, "max_guidance_scale"),
    ({"fps": INF}, "fps"),
    ({"num_frames": NAN}, "num_frames"),
    ({"motion_bucket_id": INF}, "motion_bucket_id"),
    ({"width": 1e308}, "width"),
])
def test_request_refuses_inf_and_nan(image, fields, param):
    with pytest.raises(ValidationError) as raised:
        SVDRequest(**{"image": image, **fields})
    assert raised.value.errors()[0]["loc"] == (param,)


# --- POST /v1/videos's frames and rate, through the contract's check --------------------------------


def svd_request(body: VideoCreateRequest) -> SVDRequest:
    """What the API asks of SVD for a video request: its clip length and rate."""
    return SVDRequest(num_frames=body.num_frames, seconds=body.seconds, fps=body.fps)


@pytest.mark.parametrize("seconds", [INF, 1e308, "inf", "Infinity", 1e-9, 30])
def test_seconds_must_be_finite_and_within_the_frame_limit(svd, seconds):
    body = VideoCreateRequest.model_validate({"prompt": "x", "seconds": seconds, "fps": 7})
    with pytest.raises(InvalidRequestError) as raised:
        contract.check(svd_request(body), svd.limits)  # 1e308 * 7 overflows to inf: refused, not round(inf)
    assert raised.value.param == "seconds" and "1 to 4 frames" in raised.value.message


def test_seconds_and_num_frames_within_limits(svd):
    def frames_and_rate(body: VideoCreateRequest) -> tuple[int, int]:
        request = svd_request(body)
        contract.check(request, svd.limits)
        return contract.num_frames_of(request, svd.limits), contract.fps_of(request, svd.limits)

    assert frames_and_rate(VideoCreateRequest(prompt="x", seconds=0.5, fps=6)) == (3, 6)
    assert frames_and_rate(VideoCreateRequest(prompt="x", seconds=30, num_frames=2, fps=6)) == (2, 6)
    assert frames_and_rate(VideoCreateRequest(prompt="x")) == (4, 7)  # the model's defaults


@pytest.mark.parametrize("field, value", [
    ("seconds", NAN), ("seconds", "nan"), ("fps", INF), ("fps", "inf"), ("fps", NAN), ("num_frames", INF),
    ("motion_bucket_id", NAN), ("noise_aug_strength", NAN), ("noise_aug_strength", "inf"),
    ("decode_chunk_size", INF), ("steps", 1e308), ("seed", INF), ("image_steps", NAN), ("upscale_steps", INF),
    ("noise_level", NAN),
])
def test_video_request_refuses_inf_and_nan_in_other_fields(field, value):
    """What the contract's check does not see: pydantic's int and bounded float fields refuse these,
    so the ingress answers 400 naming the field."""
    with pytest.raises(ValidationError) as raised:
        VideoCreateRequest.model_validate({"prompt": "x", field: value})
    assert raised.value.errors()[0]["loc"] == (field,)


def test_video_is_an_mp4_with_the_asked_frames_size_and_fps(svd, image):
    response = run(svd.generate(SVDRequest(image=image, seed=3, fps=8, **FAST)))
    assert isinstance(response, SVDResponse) and response.video_key is None
    frames, fps = decode_mp4(response.mp4)
    assert len(frames) == response.num_frames == 4 and fps == 8.0
    assert all(frame.size == (64, 64) for frame in frames)
    poster = Image.open(io.BytesIO(response.poster_png))
    assert poster.size == (64, 64)
    # The poster is the first frame, before lossy video compression.
    assert np.abs(np.asarray(poster, dtype=np.int16) - np.asarray(frames[0], dtype=np.int16)).mean() < 12


def test_same_seed_same_video_other_seed_differs(svd, image):
    a = run(svd.generate(SVDRequest(image=image, seed=11, num_frames=2, **FAST)))
    b = run(svd.generate(SVDRequest(image=image, seed=11, num_frames=2, **FAST)))
    c = run(svd.generate(SVDRequest(image=image, seed=12, num_frames=2, **FAST)))
    assert a.num_frames == 2 and len(frames_of(a.mp4)) == 2
    assert np.array_equal(frames_of(a.mp4), frames_of(b.mp4))
    assert np.abs(frames_of(a.mp4) - frames_of(c.mp4)).mean() > 1


def test_non_square_size_is_honoured_and_recorded_as_a_metric(svd, image, monkeypatch):
    recorded = []
    monkeypatch.setattr(metrics, "generation", lambda *args: recorded.append(args))
    response = run(svd.generate(SVDRequest(image=image, width=72, height=40, num_frames=3, seed=1, **FAST)))
    frames, _ = decode_mp4(response.mp4)
    assert (response.width, response.height) == (72, 40) and len(frames) == 3
    assert all(frame.size == (72, 40) for frame in frames)
    assert len(recorded) == 1
    model, mode, latency_s, steps, images = recorded[0]
    assert (model, mode, steps, images) == ("svd", "image_to_video", 2, 1)
    assert 0 < latency_s <= response.elapsed_s


def test_stream_reports_every_step_then_the_response(svd, image):
    events = run(collect(svd, SVDRequest(image=image, steps=3, num_frames=2)))
    assert [(e.step, e.total_steps) for e in events[:-1]] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(e, SVDProgress) for e in events[:-1]) and isinstance(events[-1], SVDResponse)


def test_stored_image_in_stored_video_out(svd, image):
    svd.storage.put_bytes("inputs/still.png", image)
    response = run(svd.generate(SVDRequest(image_key="inputs/still.png", store=True, output_id="vid_test",
                                           num_frames=2, **FAST)))
    assert response.mp4 is None and response.poster_png is None
    assert response.video_key.startswith("outputs/") and response.video_key.endswith("/vid_test/0.mp4")
    assert response.poster_key.endswith("/vid_test/0.png")
    assert len(frames_of(svd.storage.get_bytes(response.video_key))) == 2
    assert svd.storage.get_bytes(response.poster_key)[:4] == b"\x89PNG"


def test_a_caller_that_goes_away_stops_a_running_video(svd, image, monkeypatch):
    """A hang-up or a job cancel (the DeploymentHandle call is cancelled) stops the pipeline at its
    next step; the replica reads no cancel marker."""
    spy = PipelineSpy(svd.pipe)
    monkeypatch.setattr(svd, "pipe", spy)

    async def go():
        stream = svd.generate_stream(SVDRequest(image=image, num_frames=2, **{**FAST, "steps": 12}))
        await leave_after_first_step(stream, SVDProgress)
        assert await asyncio.to_thread(spy.finished.wait, 60)

    run(go())
    assert isinstance(spy.raised, JobCancelledError) and 1 <= spy.steps < 12


def test_a_caller_that_goes_away_while_waiting_never_runs(svd, image, monkeypatch):
    spy = PipelineSpy(svd.pipe)
    monkeypatch.setattr(svd, "pipe", spy)

    async def go():
        with svd._pipe_lock:  # another video holds the pipeline
            task = asyncio.ensure_future(svd.generate(SVDRequest(image=image, **FAST)))
            while not svd.stall_watch._last_progress:  # its worker thread has started, and waits
                await asyncio.sleep(0.01)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # the caller is gone before the lock frees
        with svd._pipe_lock:  # the waiting thread has taken the lock and let it go
            pass

    run(go())
    assert spy.calls == 0
