"""VideosService and UpscaleService, built for real over a tmp storage with fake model handles.

What POST /v1/videos, POST /v1/images/upscale and text-to-image-hd refuse (the field and the
message, as the models' contracts word them), and what a submitted job stores: the same JSON,
key for key and in the same order, as the ingress has always stored.
"""

from __future__ import annotations

import asyncio
import io
import json
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from api.errors import add_error_handlers
from api.files.router import router as files_router
from api.files.service import FilesService
from api.images.protocol import ImageGenerationRequest, ImageUpscaleRequest
from api.images.service import ImagesService
from api.jobs.service import JobsService
from api.models.service import ModelNotDeployedError, ModelsService
from api.text.service import LLMUnavailableError, TextService
from api.uploads import Uploads
from api.upscale.router import router as upscale_router
from api.upscale.service import UpscaleService
from api.videos.protocol import VideoCreateRequest
from api.videos.router import router as videos_router
from api.videos.service import VideosService
from deployments.errors import AtelierError, ConflictError, InvalidRequestError, NotFoundError
from deployments.llm.contract import RefineSettings
from deployments.sdxl.contract import SDXLConfig, SDXLImage, SDXLLimits, SDXLRequest, SDXLResponse
from deployments.svd.contract import SVDConfig, SVDLimits
from deployments.upscaler.contract import UpscaleRequest, UpscaleResponse, UpscalerConfig, UpscalerLimits
from graphs.job_runner import JobQueueConfig
from storage.fs import Storage
from storage.jobs import JobOutput, JobStore
from storage.registry import LoraRegistry

BASE_URL = "http://testserver/"


def run(coro):
    return asyncio.run(coro)


class FakeMethod:
    """`handle.<method>.remote(request)`: records the request, answers with `answer(request)`."""

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def remote(self, request):
        self.calls.append(request)

        async def result():
            return self.answer(request)

        return result()


class FakeHandle:
    def __init__(self, **methods):
        for name, answer in methods.items():
            setattr(self, name, FakeMethod(answer))

    def options(self, **_):
        return self


class FakeQueue:
    def __init__(self):
        self.sent = []

    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        self.sent.append(kwargs["job_id"])


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def upscaled(request: UpscaleRequest) -> UpscaleResponse:
    key = f"outputs/{request.output_id}.png" if request.output_id else None
    return UpscaleResponse(model="upscaler", media="image", key=key,
                           png=None if request.store else b"png", width=256, height=256, tiles=1,
                           seed=request.seed if request.seed is not None else 1, steps=20, noise_level=20,
                           elapsed_s=0.5)


def generated(request: SDXLRequest) -> SDXLResponse:
    images = [SDXLImage(seed=7 + i, width=request.width, height=request.height,
                        key=f"outputs/{request.output_id}-{i}.png") for i in range(request.n)]
    return SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt, negative_prompt="", steps=4,
                        guidance_scale=5.0, images=images, batch_images=request.n, elapsed_s=1.0)


@pytest.fixture
def limits():
    return {
        "sdxl": SDXLLimits.from_config(SDXLConfig(model="tiny-sdxl"), styles={}),
        "svd": SVDLimits.from_config(SVDConfig(model="tiny-svd", default_width=64, default_height=64,
                                               max_num_frames=14)),
        "upscaler": UpscalerLimits.from_config(UpscalerConfig(model="tiny-up", max_input_size=512), scale=4,
                                               max_noise_level=350),
    }


def build(tmp_path, limits, deployed=("sdxl", "svd", "upscaler")):
    storage = Storage(str(tmp_path / "storage"))
    handles = {
        "sdxl": FakeHandle(generate=generated),
        "svd": FakeHandle(),
        "upscaler": FakeHandle(upscale=upscaled),
    }
    handles = {name: handle for name, handle in handles.items() if name in deployed}
    queue = FakeQueue()
    files = FilesService(storage, presign_urls=False)
    uploads = Uploads(storage, 1 << 20, 1024 * 1024)
    store = JobStore(storage)
    jobs = JobsService(store, queue, JobQueueConfig(broker_url="x", backend_url="y"), files)
    models = ModelsService(handles, limits, LoraRegistry(storage), 1.0)
    text = TextService(None, None, RefineSettings(), models)  # no LLM deployed
    images = ImagesService(handles["sdxl"], models, text, jobs, files, storage, uploads.max_upload_pixels)
    videos = VideosService(models, images, text, jobs, store, files, uploads, storage, delete_wait_s=0.5)
    upscale = UpscaleService(models, text, jobs, files, uploads)
    return SimpleNamespace(storage=storage, handles=handles, queue=queue, store=store, videos=videos,
                           upscale=upscale, images=images)


@pytest.fixture
def app(tmp_path, limits):
    return build(tmp_path, limits)


def stored_output(app, width: int = 64, height: int = 64) -> str:
    return app.storage.put_bytes("outputs/2026/01/01/img_1/0.png", png(width, height))


def refusal(coro) -> AtelierError:
    with pytest.raises(AtelierError) as raised:
        run(coro)
    return raised.value


def video(app, upload: bytes | None = None, **fields):
    return app.videos.create(VideoCreateRequest.model_validate(fields), upload, BASE_URL)


def same_json(actual: dict, expected: dict) -> None:
    """Equal, with the keys in the same order at every level: the record's bytes do not change."""
    assert json.dumps(actual) == json.dumps(expected)


# --- POST /v1/videos: refusals ----------------------------------------------------------------------


@pytest.mark.parametrize("fields, param, message", [
    ({"prompt": "a fox", "model": "other"}, "model", "unknown model 'other'; available: ['svd']"),
    ({"prompt": "a fox", "fps": 99}, "fps", "fps must be between 1 and 60; got 99"),
    ({"prompt": "a fox", "num_frames": 15}, "num_frames", "num_frames must be between 1 and 14; got 15"),
    ({"prompt": "a fox", "seconds": 31, "fps": 7}, "seconds",  # past one clip is a chain, up to max_seconds
     "seconds must be at most 30 (the longest video, chained from clips of up to 14 frames); got 31"),
    ({"prompt": "a fox", "seconds": 1e-9, "fps": 7}, "seconds",
     "seconds=1e-09 at 7 fps is 0 frames; the model makes 1 to 14 frames (at most 2.00 s at this fps; lower fps "
     "for longer clips)"),
    ({"prompt": "a fox", "steps": 101}, "steps", "steps must be at most 100; got 101"),
    ({"prompt": "a fox", "size": "60x64"}, "size", "size sides must be multiples of 8; got 60x64"),
    ({"prompt": "a fox", "size": "2048x64"}, "size", "size sides must be between 64 and 1024 pixels; got 2048x64"),
    ({"prompt": " "}, "prompt", "give a prompt (text-to-video) or an input_reference image (image-to-video)"),
    ({"prompt": "a fox", "upscale": True, "upscale_steps": 101}, "upscale_steps",
     "upscale_steps must be at most 100; got 101"),
    ({"prompt": "a fox", "upscale_video": True, "noise_level": 351}, "noise_level",
     "noise_level must be at most 350; got 351"),
    ({"prompt": "a fox", "size": "1024x576", "upscale_video": True}, "upscale_video",
     "the video is 1024x576; each side must be between 16 and 512 pixels to upscale (the output is 4x each side)"),
    ({"prompt": "a fox", "image_size": "128x128"}, "image_size",
     "image_size sides must be between 256 and 2048 pixels; got 128x128"),
    ({"prompt": "a fox", "image_size": "260x256"}, "image_size",
     "image_size sides must be multiples of 8; got 260x256"),
    ({"prompt": "a fox", "image_size": "big"}, "image_size",
     "image_size must look like 'WIDTHxHEIGHT', e.g. '1024x1024'; got 'big'"),
    ({"prompt": "a fox", "image_size": "1024x1024", "upscale": True}, "image_size",
     "the still is 1024x1024; each side must be between 16 and 512 pixels to upscale (the output is 4x each side)"),
    ({"prompt": "a fox", "image_steps": 101}, "steps", "steps must be at most 100; got 101"),
    ({"prompt": "a fox", "style": "nope"}, "style", "unknown style 'nope'; known: []"),
    ({"input_reference_key": "jobs/x.json"}, "input_reference_key",
     "input_reference_key must name a stored output (outputs/…); got 'jobs/x.json'"),
    ({"input_reference_key": "outputs/2020/01/01/none/0.png"}, "input_reference_key",
     "no stored output at input_reference_key 'outputs/2020/01/01/none/0.png'"),
    ({"input_reference": {"image_url": "https://example.com/a.png"}}, "input_reference",
     "input_reference must be a URL of this server's files (…/v1/files/outputs/…), a data: URL, or the storage key "
     "of an output"),
])
def test_a_video_request_is_refused_naming_its_field(app, fields, param, message):
    error = refusal(video(app, **fields))
    assert isinstance(error, InvalidRequestError)
    assert (error.param, error.message) == (param, message)
    assert not app.queue.sent


def test_text_to_video_options_are_refused_with_an_image(app):
    key = stored_output(app)
    error = refusal(video(app, input_reference_key=key, refine=True))
    assert (error.param, error.message) == ("refine", "refine applies to text-to-video only (no input_reference)")
    error = refusal(video(app, png(64, 64), input_reference_key=key))
    assert (error.param, error.message) == ("input_reference_key", "give only one of input_reference, "
                                                                   "input_reference_key")


def test_a_model_that_is_not_deployed_is_a_404(tmp_path, limits):
    app = build(tmp_path, limits, deployed=("sdxl",))
    error = refusal(video(app, prompt="a fox"))
    assert isinstance(error, ModelNotDeployedError) and error.status_code == 404
    assert (error.error_type, error.param, error.message) == (
        "model_not_found", "model", "no 'svd' model is deployed in this application")
    error = refusal(app.upscale.submit(ImageUpscaleRequest(image_key="outputs/x.png"), None))
    assert (error.error_type, error.param, error.message) == (
        "model_not_found", "model", "no 'upscaler' model is deployed in this application")


def test_refine_without_a_language_model_is_a_404(app):
    error = refusal(video(app, prompt="a fox", image_size="256x256", refine=True))
    assert isinstance(error, LLMUnavailableError)
    assert (error.param, error.message) == ("model", "no language model is deployed in this application")


# --- POST /v1/videos: what the job stores -------------------------------------------------------------


def test_image_to_video_stores_the_payload_it_always_stored(app):
    key = stored_output(app)
    view = run(video(app, input_reference_key=key, seconds=1, fps=8, seed=5, motion_bucket_id=90))
    record = app.store.get(view.id)
    assert app.queue.sent == [record.id] and record.kind == "videos.image_to_video"
    assert record.stages == ["video"]
    same_json(record.request, {
        "model": "svd", "prompt": None, "size": "64x64", "seconds": "1", "num_frames": 8, "fps": 8, "seed": 5,
        "upscale_video": None,
        "svd": {"num_frames": 8, "fps": 8, "width": 64, "height": 64, "seed": 5, "steps": None,
                "decode_chunk_size": None, "motion_bucket_id": 90, "image_key": key},
    })
    assert (view.status, view.model, view.size, view.seconds, view.num_frames, view.fps) == (
        "queued", "svd", "64x64", "1", 8, 8)


def test_an_uploaded_image_is_stored_and_deleted_with_its_video(app):
    view = run(video(app, png(64, 64), prompt="a fox", upscale=True, size="64x64", seed=3, upscale_steps=5))
    record = app.store.get(view.id)
    source = record.request["svd"]["image_key"]
    assert source.startswith("uploads/") and app.storage.exists(source)
    assert record.stages == ["video", "upscale_video"]  # upscale with an image: the video is upscaled
    assert record.request["upscale_video"] == {"steps": 5, "noise_level": None, "seed": 3}
    assert view.size == "256x256"
    # Running: DELETE cancels it, and answers 409 while it has not stopped.
    app.store.update(view.id, status="in_progress")
    error = refusal(app.videos.delete(view.id))
    assert isinstance(error, ConflictError) and error.param == "video_id"
    app.store.update(view.id, status="cancelled")
    assert run(app.videos.delete(view.id)).deleted
    assert not app.storage.exists(source)
    with pytest.raises(NotFoundError):
        app.videos.record(view.id)


def test_text_to_video_stores_the_payload_it_always_stored(app):
    view = run(video(app, prompt="a fox", upscale=True, upscale_video=True, size="64x64", seed=9,
                     image_steps=4, negative_prompt="blur", noise_level=10))
    record = app.store.get(view.id)
    assert record.kind == "videos.text_to_video"
    assert record.stages == ["generate", "upscale", "video", "upscale_video"]
    # The still: 1/4 of the video, grown to SDXL's smallest side; stored as the whole SDXL request.
    sdxl = SDXLRequest(mode="text_to_image", prompt="a fox", negative_prompt="blur", n=1, width=256, height=256,
                       steps=4, seed=9).model_dump(mode="json", exclude={"image", "mask"})
    spec = {"steps": None, "noise_level": 10, "seed": 9}
    same_json(record.request, {
        "model": "svd", "prompt": "a fox", "size": "256x256", "seconds": "2", "num_frames": 14, "fps": 7, "seed": 9,
        "upscale_video": spec, "sdxl": sdxl, "refine": None, "upscale": spec,
        "svd": {"num_frames": 14, "fps": 7, "width": 64, "height": 64, "seed": 9, "steps": None,
                "decode_chunk_size": None, "image_key": None},
    })


def test_video_objects_list_and_content(app):
    key = stored_output(app)
    first = run(video(app, input_reference_key=key, num_frames=2))
    second = run(video(app, prompt="a fox", image_size="256x256"))
    listed = run(app.videos.list(None, 20, "desc", BASE_URL))
    assert [v.id for v in listed.data] == [second.id, first.id] and not listed.has_more
    assert [v.id for v in run(app.videos.list(None, 1, "asc", BASE_URL)).data] == [first.id]
    error = refusal(app.videos.content_key(first.id, "video"))
    assert isinstance(error, ConflictError) and error.message.startswith(f"video {first.id} is queued (0%")
    assert run(app.videos.cancel(first.id, BASE_URL)).id == first.id
    app.store.update(second.id, status="completed",
                     outputs=[JobOutput(key="outputs/v.mp4", content_type="video/mp4", extra={"role": "video"})])
    assert run(app.videos.content_key(second.id, "video")) == "outputs/v.mp4"
    assert run(app.videos.get(second.id, BASE_URL)).video_url == "http://testserver/v1/files/outputs/v.mp4"
    error = refusal(app.videos.content_key(second.id, "thumbnail"))
    assert (error.param, error.message) == ("variant", f"video {second.id} has no thumbnail")
    error = refusal(app.videos.content_key(second.id, "spritesheet"))
    assert error.param == "variant"
    error = refusal(app.videos.get("job_nope", BASE_URL))
    assert (error.param, error.message) == ("video_id", "no video with id 'job_nope'")


# --- POST /v1/images/upscale ----------------------------------------------------------------------------


@pytest.mark.parametrize("fields, upload, param, message", [
    ({"image_key": "outputs/x.png", "model": "big"}, None, "model", "unknown model 'big'; available: ['upscaler']"),
    ({"image_key": "outputs/x.png", "steps": 101}, None, "steps", "steps must be at most 100; got 101"),
    ({"image_key": "outputs/x.png", "noise_level": 351}, None, "noise_level",
     "noise_level must be at most 350; got 351"),
    ({}, None, "image", "give an image: a file `image`, or `image_key` or `image_url`"),
    ({}, png(8, 8), "image",
     "image is 8x8; each side must be between 16 and 512 pixels to upscale (the output is 4x each side)"),
    ({"image_url": "data:image/png;base64,!!"}, None, "image_url", "image_url is not valid base64"),
])
def test_an_upscale_request_is_refused_naming_its_field(app, fields, upload, param, message):
    error = refusal(app.upscale.submit(ImageUpscaleRequest.model_validate(fields), upload))
    assert isinstance(error, InvalidRequestError)
    assert (error.param, error.message) == (param, message)


def test_an_upscale_job_stores_the_payload_it_always_stored(app):
    key = stored_output(app)
    record = run(app.upscale.submit(ImageUpscaleRequest(image_key=key, prompt="sharp", seed=4), None))
    assert record.kind == "images.upscale" and record.stages == ["upscale"]
    same_json(app.store.get(record.id).request,
              {"upscale": {"steps": None, "noise_level": None, "seed": 4, "prompt": "sharp", "image_key": key}})
    uploaded = run(app.upscale.submit(ImageUpscaleRequest(steps=3), png(32, 32)))
    assert uploaded.request["upscale"]["image_key"].startswith("uploads/")


def test_upscale_now_sends_the_upload_and_answers_with_its_url(app):
    response = run(app.upscale.upscale(ImageUpscaleRequest(seed=2, noise_level=5), png(32, 32), BASE_URL))
    sent = app.handles["upscaler"].upscale.calls[0]
    assert sent.image is not None and sent.image_key is None and (sent.seed, sent.noise_level) == (2, 5)
    assert sent.store and response.data[0].url == f"http://testserver/v1/files/outputs/{sent.output_id}.png"
    assert response.size == "256x256"


# --- text-to-image-hd ---------------------------------------------------------------------------------


def hd_request(app, size: str):
    return run(app.images.sdxl_request(ImageGenerationRequest(prompt="a fox", size=size, upscale=True),
                                       mode="text_to_image"))


def test_text_to_image_hd_is_refused_when_sdxl_images_cannot_be_upscaled(app):
    error = refusal(app.upscale.submit_hd(hd_request(app, "1024x1024"), None))
    assert (error.param, error.message) == (
        "size",
        "image is 1024x1024; each side must be between 16 and 512 pixels to upscale (the output is 4x each side)")


def test_text_to_image_hd_job_stores_the_payload_it_always_stored(app):
    sdxl_request = hd_request(app, "256x256")
    record = run(app.upscale.submit_hd(sdxl_request, None))
    assert record.kind == "images.text_to_image_hd" and record.stages == ["generate", "upscale"]
    same_json(app.store.get(record.id).request, {
        "sdxl": sdxl_request.model_dump(mode="json", exclude={"image", "mask"}), "refine": None,
        "upscale": {"steps": None, "noise_level": None, "seed": None}})


def test_text_to_image_hd_now_upscales_each_image_with_its_seed(app):
    body = ImageGenerationRequest(prompt="a fox", size="256x256", n=2, upscale=True, response_format="b64_json")
    sdxl_request = run(app.images.sdxl_request(body, mode="text_to_image"))
    response = run(app.upscale.generate_hd(body, sdxl_request, None, BASE_URL))
    calls = app.handles["upscaler"].upscale.calls
    assert [c.seed for c in calls] == [7, 8] and all(c.image_key and not c.store for c in calls)
    assert len(response.data) == 2 and response.data[0].b64_json and response.model == "sdxl+upscaler"


# --- the routers: a form's file reaches the service, 202s say where to look ------------------------------


def test_the_routers_read_forms_and_answer_202_with_a_location(app):
    http = FastAPI()
    add_error_handlers(http)
    for router in (videos_router, upscale_router, files_router):
        http.include_router(router)
    http.state.videos, http.state.upscale, http.state.files = app.videos, app.upscale, app.videos.files
    client = TestClient(http)
    answer = client.post("/v1/videos", data={"seconds": "1", "fps": "8", "noise_aug_strength": ""},
                         files={"input_reference": ("a.png", png(64, 64), "image/png")})
    assert answer.status_code == 202 and answer.headers["location"] == f"/v1/videos/{answer.json()['id']}"
    assert answer.json()["kind"] == "videos.image_to_video" and answer.json()["num_frames"] == 8
    answer = client.post("/v1/videos", data={"prompt": "x"}, files={"mask": ("m.png", b"x", "image/png")})
    assert answer.status_code == 400 and answer.json()["error"] == {
        "type": "invalid_request_error", "message": "unexpected file field 'mask'", "param": "mask"}
    answer = client.post("/v1/images/upscale", headers={"prefer": "respond-async"},
                         files={"image": ("a.png", png(32, 32), "image/png")})
    assert answer.status_code == 202 and answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"
    assert answer.json()["params"]["upscale"]["image_key"].startswith("uploads/")
