"""The SVD deployment class without Ray, on the tiny model: limits, MP4 output, seeds, progress, cancel."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.tiny_models import ensure_tiny_models
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.media import decode_mp4
from deployments.svd import SVDDeployment, SVDProgress, SVDRequest, SVDResponse
from storage.jobs import JobStore

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


def _running_job(svd) -> str:
    jobs = JobStore(svd.storage)
    record = jobs.create("videos", {})
    jobs.update(record.id, status="in_progress")
    return record.id


def test_cancel_marker_before_the_run(svd, image):
    job_id = _running_job(svd)
    JobStore(svd.storage).request_cancel(job_id)
    with pytest.raises(JobCancelledError):
        run(svd.generate(SVDRequest(image=image, job_id=job_id, **FAST)))


def test_cancel_marker_stops_a_running_video(svd, image):
    job_id = _running_job(svd)
    steps = 12
    seen = []

    async def go():
        async for event in svd.generate_stream(SVDRequest(image=image, job_id=job_id, num_frames=2,
                                                          **{**FAST, "steps": steps})):
            seen.append(event)
            if len(seen) == 1:
                await asyncio.to_thread(JobStore(svd.storage).request_cancel, job_id)

    with pytest.raises(JobCancelledError):
        run(go())
    assert 1 <= len(seen) < steps and all(isinstance(e, SVDProgress) for e in seen)
