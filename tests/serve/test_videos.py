"""Videos (OpenAI's Videos API shapes), upscaling and the composed pipelines, on the tiny models.

Sizes stay at or near 64x64 (the tiny models' native size), 2-4 frames and 2 steps, so each
pipeline runs in seconds on CPU.
"""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from deployments.media import decode_mp4
from tests.serve.helpers import assert_error, decode_b64_png, noise_image, read_events, wait_for_job

pytestmark = pytest.mark.serve

MAX_FRAMES = 4  # the tiny SVD's UNet num_frames (local/tiny_models.py)
FAST = {"steps": 2, "size": "64x64", "seed": 7}


def create(client, files=None, **fields) -> dict:
    if files:
        response = client.post("/v1/videos", data={k: str(v) for k, v in fields.items()}, files=files)
    else:
        response = client.post("/v1/videos", json=fields)
    assert response.status_code == 202, response.text
    video = response.json()
    assert response.headers["location"] == f"/v1/videos/{video['id']}"
    return video


def wait_for_video(client, video_id: str, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed", "cancelled"):
            return video
        time.sleep(0.25)
    raise AssertionError(f"video {video_id} not finished after {timeout_s}s: {video}")


def content(client, video_id: str, variant: str = "video") -> httpx.Response:
    return client.get(f"/v1/videos/{video_id}/content", params={"variant": variant}, follow_redirects=True)


def decoded(mp4: bytes) -> tuple[list[Image.Image], float]:
    assert mp4[4:8] == b"ftyp", "not an MP4"
    return decode_mp4(mp4)


# --- image-to-video --------------------------------------------------------------------------------


def test_image_to_video_returns_a_playable_mp4(client):
    # A non-default, non-square size off the 16-pixel grid (SVD takes multiples of 8): the MP4
    # must come back at exactly this size, not the model's default nor a codec-rounded one.
    video = create(client, files={"input_reference": ("in.png", noise_image(64, 64, seed=1), "image/png")},
                   prompt="waves", num_frames=3, fps=6, **{**FAST, "size": "72x40"})
    assert video["object"] == "video" and video["model"] == "svd"
    assert video["status"] in ("queued", "in_progress") and 0 <= video["progress"] < 100
    assert video["kind"] == "videos.image_to_video" and video["stages"] == ["video"]
    assert (video["seconds"], video["size"], video["num_frames"], video["fps"]) == ("0.5", "72x40", 3, 6)

    final = wait_for_video(client, video["id"])
    assert final["status"] == "completed" and final["progress"] == 100, final
    assert final["completed_at"] >= final["created_at"] and final["error"] is None

    response = content(client, video["id"])
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    frames, fps = decoded(response.content)
    assert len(frames) == 3 and all(frame.size == (72, 40) for frame in frames)
    assert fps == pytest.approx(6)
    assert final["result"]["stages"]["video"]["width"] == 72 and final["result"]["stages"]["video"]["height"] == 40
    thumbnail = content(client, video["id"], "thumbnail")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (72, 40)
    # the same job, seen through the jobs API
    job = client.get(f"/v1/jobs/{video['id']}").json()
    assert job["status"] == "completed" and [o["content_type"] for o in job["outputs"]] == ["video/mp4", "image/png"]


def test_image_to_video_from_a_stored_output_with_upscale(client):
    """input_reference as OpenAI's reference object naming one of this server's outputs; the video x4."""
    image = client.post("/v1/images/generations", json={"prompt": "a kite", **FAST}).json()["data"][0]["url"]
    video = create(client, prompt="a kite", input_reference={"image_url": image}, num_frames=2, upscale=True,
                   upscale_steps=2, **FAST)
    assert video["stages"] == ["video", "upscale_video"] and video["size"] == "256x256"
    final = wait_for_video(client, video["id"])
    assert final["status"] == "completed", final
    frames, _ = decoded(content(client, video["id"]).content)
    assert len(frames) == 2 and frames[0].size == (256, 256)
    stages = final["result"]["stages"]
    assert stages["video"]["width"] == 64 and stages["upscale_video"]["width"] == 256
    # the referenced output is read in place, not copied
    assert final["result"]["input_key"] == image.split("/v1/files/", 1)[1]


def test_a_long_video_chains_clips_into_one_job(client):
    """seconds past one clip (the tiny SVD makes 4 frames): 8 frames at 8 fps are 3 clips of 4, each
    after the first overlapping the one before by 2 frames, crossfaded, in one "video" stage."""
    video = create(client, files={"input_reference": ("in.png", noise_image(64, 64, seed=5), "image/png")},
                   seconds=1, fps=8, **FAST)
    assert (video["num_frames"], video["seconds"], video["stages"]) == (8, "1", ["video"])
    final = wait_for_video(client, video["id"])
    assert final["status"] == "completed" and final["progress"] == 100, final
    stages = final["result"]["stages"]
    clips = [stages[f"video.clip-{i}"] for i in range(3)]
    assert [c["seed"] for c in clips] == [7, 8, 9] and [c["num_frames"] for c in clips] == [4, 4, 4]
    assert clips[1]["image_key"] == clips[0]["handoff_key"] and clips[2]["image_key"] == clips[1]["handoff_key"]
    assert (stages["video"]["clips"], stages["video"]["overlap"], stages["video"]["num_frames"]) == (3, 2, 8)

    frames, fps = decoded(content(client, video["id"]).content)
    assert len(frames) == 8 and fps == pytest.approx(8) and frames[0].size == (64, 64)
    # continuity: the steps through the crossfades are no bigger than the steps within a clip
    pixels = np.stack([np.asarray(frame) for frame in frames]).astype(np.int16)
    steps = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2, 3))
    within = []
    for clip in clips:
        clip_frames, _ = decoded(client.get(f"/v1/files/{clip['key']}").content)
        clip_pixels = np.stack([np.asarray(frame) for frame in clip_frames]).astype(np.int16)
        within.extend(np.abs(np.diff(clip_pixels, axis=0)).mean(axis=(1, 2, 3)))
    assert steps[1:6].max() <= 1.25 * np.median(within), (steps, within)


# --- upscaling -------------------------------------------------------------------------------------


def test_upscale_sync_is_4x_each_side(client):
    response = client.post("/v1/images/upscale", files={"image": ("in.png", noise_image(32, 48), "image/png")},
                           data={"steps": "2", "seed": "3", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "128x192" and body["data"][0]["seed"] == 3
    assert decode_b64_png(body["data"][0]["b64_json"]).size == (128, 192)


def test_upscale_async_from_an_upload_and_from_a_stored_key(client):
    response = client.post("/v1/images/upscale", params={"async": "true"},
                           files={"image": ("in.png", noise_image(40, 24), "image/png")}, data={"steps": "2"})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "completed" and job["kind"] == "images.upscale" and job["stages"] == ["upscale"]
    output = job["outputs"][0]
    assert (output["width"], output["height"]) == (160, 96)
    assert Image.open(io.BytesIO(httpx.get(output["url"]).content)).size == (160, 96)

    # JSON naming a stored output (here: a 64x64 SDXL image) by key, answered with a URL
    sdxl_url = client.post("/v1/images/generations", json={"prompt": "a pear", **FAST}).json()["data"][0]["url"]
    key = sdxl_url.split("/v1/files/", 1)[1]
    sync = client.post("/v1/images/upscale", json={"image_key": key, "steps": 2})
    assert sync.status_code == 200, sync.text
    assert Image.open(io.BytesIO(httpx.get(sync.json()["data"][0]["url"]).content)).size == (256, 256)


def test_text_to_image_hd_sync_and_as_a_job(client):
    sync = client.post("/v1/images/generations", json={
        "prompt": "a castle", "n": 2, "size": "32x32", "steps": 2, "seed": 4, "upscale": True,
        "response_format": "b64_json"})
    assert sync.status_code == 200, sync.text
    body = sync.json()
    assert body["size"] == "128x128" and [d["seed"] for d in body["data"]] == [4, 5]
    assert all(decode_b64_png(d["b64_json"]).size == (128, 128) for d in body["data"])

    response = client.post("/v1/images/generations", params={"async": "true"}, json={
        "prompt": "a castle", "size": "32x32", "steps": 2, "upscale": True})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "completed" and job["kind"] == "images.text_to_image_hd", job
    assert job["stages"] == ["generate", "upscale"]
    assert [(o["width"], o["height"]) for o in job["outputs"]] == [(128, 128)]


# --- text-to-video: the whole graph as one job ----------------------------------------------------------


def test_text_to_video_runs_every_stage_as_one_job(client):
    expected = ["refine", "generate", "upscale", "video", "upscale_video"]
    video = create(client, prompt="a lighthouse at dusk", refine=True, upscale=True, upscale_video=True,
                   num_frames=2, image_steps=2, upscale_steps=2, **FAST)
    assert video["kind"] == "videos.text_to_video" and video["stages"] == expected
    assert video["size"] == "256x256"  # the video you download, after the video upscale

    events = read_events(client, video["id"], timeout_s=400)
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress), progress  # one job: overall progress never goes back
    seen: list[str] = []
    for event in events:
        if event["stage"] and event["stage"] not in seen[-1:]:
            seen.append(event["stage"])
    # What SSE polling happened to catch only moves forward; that every stage ran is shown below.
    assert seen == [s for s in expected if s in seen], seen
    # progress was reported within a stage, step by step, not only at stage boundaries
    assert any(e["status"] == "in_progress" and 0 < e["stage_progress"] < 100 for e in events), events
    final = events[-1]
    assert final["status"] == "completed" and final["progress"] == 100 and final["stage"] == "upscale_video"

    # The job's stage history: every stage ran, in order, one after another, each to its last
    # step (100%), each handing its output's key to the next.
    stages = final["result"]["stages"]
    assert list(stages) == expected
    for name in expected:
        assert stages[name]["stage_progress"] == 100 and stages[name]["total_steps"] >= 1, (name, stages[name])
        assert stages[name]["started_at"] <= stages[name]["finished_at"]
    for before, after in zip(expected, expected[1:]):
        assert stages[before]["finished_at"] <= stages[after]["started_at"]
    assert stages["refine"]["refined"]["original_prompt"] == "a lighthouse at dusk"
    assert (stages["generate"]["width"], stages["upscale"]["width"]) == (32, 128)  # still: SDXL minimum, x4
    assert stages["video"]["width"] == 64 and stages["upscale_video"]["width"] == 256
    assert final["result"]["prompt"] == stages["refine"]["refined"]["prompt"]

    frames, _ = decoded(content(client, video["id"]).content)
    assert len(frames) == 2 and frames[0].size == (256, 256)
    for stage in ("generate", "upscale"):  # intermediates stay downloadable by key
        key = stages[stage]["keys"][0]
        assert client.get(f"/v1/files/{key}").status_code == 200


def test_cancel_mid_pipeline_stops_the_remaining_stages(client):
    # A slow still (256x256, 50 steps) so the cancel lands while SDXL runs.
    video = create(client, prompt="a slow still", image_size="256x256", image_steps=50, num_frames=2, **FAST)
    assert video["stages"] == ["generate", "video"]
    deadline = time.monotonic() + 120
    while True:
        current = client.get(f"/v1/videos/{video['id']}").json()
        if current["stage"] == "generate":
            break
        assert current["status"] in ("queued", "in_progress"), current
        assert time.monotonic() < deadline, "never reached the generate stage"
        time.sleep(0.1)
    assert_error(content(client, video["id"]), 409, "video_id")  # not completed yet

    cancelled = client.post(f"/v1/videos/{video['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["id"] == video["id"]
    final = wait_for_video(client, video["id"])
    assert final["status"] == "cancelled" and final["progress"] < 50, final
    assert final["stage"] == "generate"  # SVD never started
    assert "video" not in final["result"]["stages"] and final["video_url"] is None
    stopped = client.get(f"/v1/jobs/{video['id']}").json()
    time.sleep(1.0)  # nothing runs on afterwards: the record does not change again
    job = client.get(f"/v1/jobs/{video['id']}").json()
    assert job == stopped
    assert job["status"] == "cancelled" and job["stage"] == "generate" and job["outputs"] == []
    assert job["stage_progress"] < 100, job  # stopped inside SDXL's steps, before its last one
    error = assert_error(content(client, video["id"]), 404, "video_id")
    assert "cancelled" in error["message"]


# --- the official openai client ----------------------------------------------------------------------


@pytest.fixture()
def oai(atelier):
    return openai.OpenAI(base_url=f"{atelier.base_url}/v1", api_key="unused-locally", max_retries=0)


def test_openai_client_create_retrieve_download(oai):
    video = oai.videos.create(prompt="a turning leaf", input_reference=("leaf.png", noise_image(64, 64), "image/png"),
                              size="64x64", extra_body={"num_frames": 2, "steps": 2, "seed": 1})
    assert video.object == "video" and video.status in ("queued", "in_progress") and video.model == "svd"
    deadline = time.monotonic() + 300
    while video.status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.25)
        video = oai.videos.retrieve(video.id)
    assert video.status == "completed" and video.progress == 100 and video.size == "64x64"

    frames, _ = decoded(oai.videos.download_content(video.id).content)
    assert len(frames) == 2 and frames[0].size == (64, 64)
    thumbnail = oai.videos.download_content(video.id, variant="thumbnail").content
    assert thumbnail[:8] == b"\x89PNG\r\n\x1a\n"
    assert video.id in [v.id for v in oai.videos.list(limit=50).data]

    deleted = oai.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        oai.videos.retrieve(video.id)


def test_openai_client_bad_request_is_typed(oai):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.videos.create(prompt="too long", seconds="60")  # past max_seconds (30): even chained clips stop there
    assert raised.value.body["param"] == "seconds"


# --- bad input: a 4xx naming the field, before any job is made ----------------------------------------------


@pytest.mark.parametrize("override, param", [
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": MAX_FRAMES + 1}, "num_frames"),
    ({"fps": 0}, "fps"),
    ({"fps": 1000}, "fps"),
    ({"seconds": 31}, "seconds"),  # past max_seconds (30); up to it, clips are chained
    ({"seconds": 1e308}, "seconds"),  # finite, but inf once times fps
    ({"seconds": 1e-9}, "seconds"),  # rounds to 0 frames
    ({"size": "7x7"}, "size"),
    ({"size": "wide"}, "size"),
    ({"steps": 10_000}, "steps"),
    ({"model": "sora-2"}, "model"),
    ({"prompt": None}, "prompt"),
    ({"motion_bucket_id": 300}, "motion_bucket_id"),
    ({"input_reference_key": "jobs/x.json"}, "input_reference_key"),
    ({"input_reference_key": "outputs/2020/01/01/none/0.png"}, "input_reference_key"),
    ({"input_reference": {"image_url": "https://example.com/cat.png"}}, "input_reference"),
    ({"input_reference": "data:image/png;base64,bm90IGFuIGltYWdl"}, "input_reference"),
    ({"upscale": True, "upscale_steps": 10_000}, "upscale_steps"),
    ({"image_size": "8x8"}, "image_size"),
    ({"bogus": 1}, "bogus"),
])
def test_bad_video_request(client, override, param):
    before = newest_job(client)
    body = {"prompt": "x", **FAST, **override}
    assert_error(client.post("/v1/videos", json={k: v for k, v in body.items() if v is not None}), 400, param)
    assert newest_job(client) == before  # refused before any job was made


def newest_job(client) -> list[str]:
    return [job["id"] for job in client.get("/v1/jobs", params={"limit": 1}).json()["data"]]


def test_non_finite_numbers_are_400_naming_the_field(client):
    """JSON's Infinity and NaN (Python's json reads them), and "inf"/"nan"/"1e308" in a form."""
    before = newest_job(client)
    for field, value in [("seconds", "Infinity"), ("seconds", "-Infinity"), ("seconds", "NaN"),
                         ("fps", "Infinity"), ("motion_bucket_id", "NaN"), ("noise_aug_strength", "NaN"),
                         ("noise_aug_strength", "Infinity"), ("decode_chunk_size", "Infinity")]:
        raw = f'{{"prompt": "x", "steps": 2, "size": "64x64", "{field}": {value}}}'
        response = client.post("/v1/videos", content=raw, headers={"content-type": "application/json"})
        assert_error(response, 400, field)
    image = {"input_reference": ("in.png", noise_image(64, 64), "image/png")}
    for field, value in [("seconds", "inf"), ("seconds", "nan"), ("seconds", "1e308"), ("fps", "inf"),
                         ("motion_bucket_id", "nan"), ("noise_aug_strength", "inf"), ("steps", "inf")]:
        response = client.post("/v1/videos", data={"prompt": "x", "size": "64x64", field: value}, files=image)
        assert_error(response, 400, field)
    assert newest_job(client) == before


def test_bad_video_upload(client):
    response = client.post("/v1/videos", data={"prompt": "x", "num_frames": "0"},
                           files={"input_reference": ("in.png", noise_image(64, 64), "image/png")})
    assert_error(response, 400, "num_frames")
    response = client.post("/v1/videos", data={"prompt": "x"},
                           files={"input_reference": ("in.png", b"not an image", "image/png")})
    assert_error(response, 400, "input_reference")


def test_unknown_video_ids_are_404(client):
    assert_error(client.get("/v1/videos/job_doesnotexist"), 404, "video_id")
    assert_error(client.get("/v1/videos/job_doesnotexist/content"), 404, "video_id")
    assert_error(client.post("/v1/videos/job_doesnotexist/cancel"), 404, "video_id")
    assert_error(client.delete("/v1/videos/job_doesnotexist"), 404, "video_id")
    # an image job is not a video
    job = client.post("/v1/images/generations", params={"async": "true"}, json={"prompt": "x", **FAST}).json()
    assert_error(client.get(f"/v1/videos/{job['id']}"), 404, "video_id")


@pytest.mark.parametrize("size, message", [((8, 8), "between 16 and 256"), ((300, 260), "between 16 and 256")])
def test_upscale_image_too_small_or_too_large(client, size, message):
    image = noise_image(*size)
    for params in ({}, {"async": "true"}):
        response = client.post("/v1/images/upscale", params=params, files={"image": ("in.png", image, "image/png")})
        error = assert_error(response, 400, "image")
        assert message in error["message"] and f"{size[0]}x{size[1]}" in error["message"]


def test_bad_upscale_requests(client):
    assert_error(client.post("/v1/images/upscale", json={}), 400, "image")
    assert_error(client.post("/v1/images/upscale", json={"image_key": "outputs/nope.png"}), 400, "image_key")
    image = {"image": ("in.png", noise_image(32, 32), "image/png")}
    assert_error(client.post("/v1/images/upscale", files=image, data={"steps": "10000"}), 400, "steps")
    assert_error(client.post("/v1/images/upscale", files=image, data={"noise_level": "100000"}), 400, "noise_level")
    assert_error(client.post("/v1/images/upscale", files=image, data={"steps": "inf"}), 400, "steps")
    assert_error(client.post("/v1/images/upscale", files=image, data={"noise_level": "nan"}), 400, "noise_level")
    raw = '{"image_key": "outputs/nope.png", "seed": Infinity}'
    assert_error(client.post("/v1/images/upscale", content=raw, headers={"content-type": "application/json"}),
                 400, "seed")
    # text-to-image-hd: an SDXL size the upscaler cannot take
    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "size": "512x512", "upscale": True}),
                 400, "size")
