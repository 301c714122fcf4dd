"""Videos (OpenAI's Videos API shapes) and image upscaling.

    POST   /v1/videos                  JSON or multipart → 202 video object; one job runs every stage
    GET    /v1/videos                  list, newest first (`after`, `limit`, `order`)
    GET    /v1/videos/{id}             video object: status, progress 0-100, current stage
    GET    /v1/videos/{id}/content     the MP4 (`?variant=thumbnail`: the poster PNG); 409 until completed
    POST   /v1/videos/{id}/cancel      stops the remaining stages
    DELETE /v1/videos/{id}             cancels if running, then deletes the video's files and record
    POST   /v1/images/upscale          multipart `image`, or JSON `image_key`/`image_url`: x4, sync or ?async=true
    POST   /v1/images/generations      with `"upscale": true`: text-to-image-hd (`generate_hd`, called by the ingress)

With an input image, POST /v1/videos is image-to-video (SVD, then optionally a x4 video upscale);
with only a prompt it is text-to-video (optional Gemma refine → SDXL → optional x4 upscale of
the still → SVD). The pipelines are in graphs/video_pipelines.py. Everything is checked here
against the models' `describe()` limits before a job is enqueued, so bad input is a 400 naming
the field, and a job fails only for reasons that could not be seen up front.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import re
import time
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import UploadFile

from api import current_ingress
from api.text import router as text_api
from deployments.errors import AtelierError, ConflictError, InvalidRequestError, NotFoundError, parse_json
from deployments.llm.contract import RefineRequest
from deployments.media import check_size, decode_image, parse_size
from api.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImageReference,
    ImagesResponse,
    ImageUpscaleRequest,
    JobView,
    VideoCreateRequest,
    VideoDeleted,
    VideoError,
    VideoList,
    VideoObject,
)
from deployments.diffusion import random_seed
from deployments.sdxl.deployment import SDXLRequest, routed
from deployments.upscaler.deployment import UpscaleRequest, UpscaleResponse
from graphs.pipelines import apply_refined
from storage.fs import InvalidKeyError, ObjectNotFoundError, validate_key
from storage.jobs import JobNotFoundError, JobRecord
from storage.keys import OUTPUTS_PREFIX, new_id

router = APIRouter(tags=["videos"], responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})

VIDEO_KINDS = ("videos.image_to_video", "videos.text_to_video")
DELETE_WAIT_S = 10.0  # how long DELETE waits for a cancelled video to stop before answering 409


def _wants_async(request: Request, async_flag: bool) -> bool:
    return async_flag or "respond-async" in request.headers.get("prefer", "")


def _body_schema(model) -> dict:
    """OpenAPI for a route that reads JSON or a multipart form itself (nested models inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    schema = inline(schema)
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": {"type": "object", "description": "The same fields as form fields, "
                                           "with the image as a file."}},
    }}}


# --- request bodies: JSON or multipart -----------------------------------------------------------

_NESTED_FIELD = re.compile(r"(\w+)\[(\w+)\]")


async def read_body(ingress, request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(fields, files) of a JSON object or a form. In a form, `a[b]` (how the OpenAI SDK sends an
    object in multipart) becomes a nested dict, and empty fields count as not given."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raw = await request.body()
        body = parse_json(raw, "body") if raw else {}
        if not isinstance(body, dict):
            raise InvalidRequestError("request body must be a JSON object", "body")
        return body, {}
    try:
        form = await request.form()
    except AtelierError:
        raise  # over the size limit while reading
    except Exception as exc:
        raise InvalidRequestError(f"the form could not be read: {exc}", "body") from exc
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files[name] = await ingress.read_upload(value, name)
            elif value == "":
                continue
            elif match := _NESTED_FIELD.fullmatch(name):
                nested = fields.setdefault(match[1], {})
                if not isinstance(nested, dict):
                    raise InvalidRequestError(f"{match[1]} is given both as a value and as an object", match[1])
                nested[match[2]] = value
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files


# --- image references ----------------------------------------------------------------------------


def _reference_key(value: str, param: str) -> str | bytes:
    """A reference string → the storage key it names, or the bytes of a data: URL."""
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequestError(f"{param} data: URLs must be base64 encoded", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{param} is not valid base64", param) from None
    key = value
    if value.startswith(("http://", "https://", "/")):
        path = unquote(urlsplit(value).path)
        if "/v1/files/" not in path:
            raise InvalidRequestError(
                f"{param} must be a URL of this server's files (…/v1/files/outputs/…), a data: URL, "
                "or the storage key of an output", param)
        key = path.split("/v1/files/", 1)[1]
    try:
        validate_key(key)
    except InvalidKeyError:
        raise InvalidRequestError(f"{param} {value!r} is not a valid storage key", param) from None
    if not key.startswith(OUTPUTS_PREFIX):  # only generated outputs, never records or uploads
        raise InvalidRequestError(f"{param} must name a stored output (outputs/…); got {key!r}", param)
    return key


async def load_image(ingress, sources: dict[str, Any]) -> tuple[str | None, bytes | None, Image.Image | None]:
    """The one given image source → (its key, or its bytes if it came with the request; the decoded image).

    `sources` maps each field name to its value: bytes (an upload), a reference string or
    ImageReference, or None. The image is decoded here so a bad one is a 400 naming its field.
    """
    given = {name: value for name, value in sources.items() if value is not None}
    if len(given) > 1:
        raise InvalidRequestError(f"give only one of {', '.join(given)}", list(given)[1])
    if not given:
        return None, None, None
    param, value = given.popitem()
    if isinstance(value, ImageReference):
        if (value.image_url is None) == (value.file_id is None):
            raise InvalidRequestError(f"{param} needs exactly one of image_url and file_id", param)
        value = value.image_url or value.file_id
    if isinstance(value, str):
        value = _reference_key(value, param)
    key, data = (None, value) if isinstance(value, bytes) else (value, None)
    if key is not None:
        try:
            data = await asyncio.to_thread(ingress.storage.get_bytes, key)
        except (ObjectNotFoundError, InvalidKeyError):
            raise InvalidRequestError(f"no stored output at {param} {key!r}", param) from None
    image = decode_image(data, param, max_pixels=ingress.config.max_upload_pixels)
    return key, (None if key else data), image


async def store_upload(ingress, data: bytes) -> str:
    """Jobs read their input from storage: an upload is stored once, then passed by key."""
    return await asyncio.to_thread(ingress.storage.put_bytes, f"uploads/{new_id('upload')}/image", data)


# --- checks against the models' limits -----------------------------------------------------------


def check_model(info: dict, model: str | None) -> None:
    if model is not None and model != info["model"]:
        raise InvalidRequestError(f"unknown model {model!r}; available: [{info['model']!r}]", "model")


def check_upscalable(info: dict, width: int, height: int, param: str, what: str = "image",
                     num_frames: int | None = None) -> None:
    low, high = info["min_input_size"], info["max_input_size"]
    if min(width, height) < low or max(width, height) > high:
        raise InvalidRequestError(
            f"{what} is {width}x{height}; each side must be between {low} and {high} pixels to upscale "
            f"(the output is {info['scale']}x each side)", param)
    if num_frames is not None and num_frames > info["max_frames"]:
        raise InvalidRequestError(
            f"{what} has {num_frames} frames; the upscaler takes at most {info['max_frames']}", param)


def upscale_spec(info: dict, steps: int | None, noise_level: int | None, seed: int | None,
                 steps_param: str = "steps") -> dict:
    if steps is not None and steps > info["max_steps"]:
        raise InvalidRequestError(f"{steps_param} must be at most {info['max_steps']}; got {steps}", steps_param)
    if noise_level is not None and noise_level > info["max_noise_level"]:
        raise InvalidRequestError(
            f"noise_level must be at most {info['max_noise_level']}; got {noise_level}", "noise_level")
    return {"steps": steps, "noise_level": noise_level, "seed": seed}


def frames_and_rate(info: dict, body: VideoCreateRequest) -> tuple[int, int]:
    """(num_frames, fps) within the model's limits; num_frames wins over seconds."""
    fps = body.fps if body.fps is not None else info["default_fps"]
    if not info["min_fps"] <= fps <= info["max_fps"]:
        raise InvalidRequestError(f"fps must be between {info['min_fps']} and {info['max_fps']}; got {fps}", "fps")
    limit = info["max_num_frames"]
    if body.num_frames is not None:
        if not 1 <= body.num_frames <= limit:
            raise InvalidRequestError(f"num_frames must be between 1 and {limit}; got {body.num_frames}",
                                      "num_frames")
        return body.num_frames, fps
    if body.seconds is not None:
        # JSON's Infinity, a form's "inf", or a finite 1e308 that overflows once times fps: each is
        # refused here before round() (which raises on inf and nan) ever sees it.
        frames = body.seconds * fps
        num_frames = round(frames) if math.isfinite(frames) else None
        if num_frames is None or not 1 <= num_frames <= limit:
            raise InvalidRequestError(
                f"seconds={body.seconds:g} at {fps} fps is {num_frames if num_frames is not None else 'too many'} "
                f"frames; the model makes 1 to {limit} frames (at most {limit / fps:.2f} s at this fps; lower fps "
                "for longer clips)", "seconds")
        return num_frames, fps
    return info["default_num_frames"], fps


def seconds_of(num_frames: int, fps: int) -> str:
    return f"{num_frames / fps:.2f}".rstrip("0").rstrip(".")


def still_size(video_size: tuple[int, int], upscale: bool, scale: int, sdxl: dict) -> tuple[int, int]:
    """The SDXL still for a video: its size, or, when the still is upscaled, 1/scale of it, grown
    evenly to SDXL's minimum side (SVD crops it to the video's shape)."""
    width, height = video_size
    if not upscale:
        return width, height
    width, height = width / scale, height / scale
    grow = max(1.0, sdxl["min_size"] / min(width, height))
    return math.ceil(width * grow / 8) * 8, math.ceil(height * grow / 8) * 8


# --- POST /v1/videos -------------------------------------------------------------------------------


@router.post("/v1/videos", status_code=202, response_model=VideoObject,
             summary="Create a video: image-to-video with input_reference, or text-to-video from a prompt",
             openapi_extra=_body_schema(VideoCreateRequest))
async def create_video(request: Request, ingress=Depends(current_ingress)) -> JSONResponse:
    fields, files = await read_body(ingress, request)
    upload = files.pop("input_reference", None)
    if files:
        raise InvalidRequestError(f"unexpected file field {next(iter(files))!r}", next(iter(files)))
    body = VideoCreateRequest.model_validate(fields)

    # 1. The video model's limits: frames, rate, size, steps.
    svd = await ingress.model_info("svd")
    check_model(svd, body.model)
    num_frames, fps = frames_and_rate(svd, body)
    if body.steps is not None and body.steps > svd["max_steps"]:
        raise InvalidRequestError(f"steps must be at most {svd['max_steps']}; got {body.steps}", "steps")
    width, height = parse_size(body.size) if body.size else (svd["default_width"], svd["default_height"])
    check_size(width, height, min_size=svd["min_size"], max_size=svd["max_size"], multiple=svd["size_multiple"])
    seed = body.seed if body.seed is not None else random_seed()  # one seed for every stage, recorded

    # 2. The source: an image (image-to-video) or a prompt (text-to-video).
    key, data, image = await load_image(ingress, {
        "input_reference": upload if upload is not None else body.input_reference,
        "input_reference_key": body.input_reference_key,
    })
    text_to_video = image is None
    if text_to_video and not (body.prompt or "").strip():
        raise InvalidRequestError("give a prompt (text-to-video) or an input_reference image (image-to-video)",
                                  "prompt")
    if not text_to_video:
        for name in ("refine", "image_size", "image_steps", "negative_prompt", "style"):
            if getattr(body, name):
                raise InvalidRequestError(f"{name} applies to text-to-video only (no input_reference)", name)

    # 3. Upscaling: the still before SVD (text-to-video), the video after it (image-to-video, or asked).
    upscale_video = body.upscale_video or (body.upscale and not text_to_video)
    upscale_still = body.upscale and text_to_video
    up = spec = None
    if upscale_still or upscale_video:
        up = await ingress.model_info("upscaler")
        spec = upscale_spec(up, body.upscale_steps, body.noise_level, seed, "upscale_steps")
        if upscale_video:
            check_upscalable(up, width, height, "upscale_video" if body.upscale_video else "upscale", "the video",
                             num_frames)
    final_size = (width * up["scale"], height * up["scale"]) if upscale_video else (width, height)

    svd_request = {
        "num_frames": num_frames, "fps": fps, "width": width, "height": height, "seed": seed, "steps": body.steps,
        "decode_chunk_size": body.decode_chunk_size,
        **{name: getattr(body, name) for name in ("motion_bucket_id", "noise_aug_strength")
           if getattr(body, name) is not None},
    }
    payload: dict[str, Any] = {
        "model": svd["model"], "prompt": body.prompt, "size": f"{final_size[0]}x{final_size[1]}",
        "seconds": seconds_of(num_frames, fps), "num_frames": num_frames, "fps": fps, "seed": seed,
        "upscale_video": spec if upscale_video else None,
    }
    stages = ["video"] + (["upscale_video"] if upscale_video else [])
    if text_to_video:
        # 4a. The still: SDXL's limits (and the upscaler's, when it is upscaled), Gemma if asked.
        sdxl = await ingress.sdxl_info()
        if body.image_size:
            image_w, image_h = parse_size(body.image_size, "image_size")
            check_size(image_w, image_h, min_size=sdxl["min_size"], max_size=sdxl["max_size"], param="image_size")
        else:
            image_w, image_h = still_size((width, height), upscale_still, up["scale"] if up else 4, sdxl)
        if upscale_still:
            check_upscalable(up, image_w, image_h, "image_size" if body.image_size else "upscale", "the still")
        still = ImageGenerationRequest(
            prompt=body.prompt, size=f"{image_w}x{image_h}", steps=body.image_steps, seed=seed,
            negative_prompt=body.negative_prompt, style=body.style, refine=body.refine)
        sdxl_request = await ingress._sdxl_request(still, mode="text_to_image")
        refine = await ingress._refine_payload(still) if body.refine else None
        payload.update(ingress._sdxl_payload(sdxl_request), refine=refine,
                       upscale=spec if upscale_still else None, svd={**svd_request, "image_key": None})
        stages = (["refine"] if refine else []) + ["generate"] + (["upscale"] if upscale_still else []) + stages
        kind = "videos.text_to_video"
    else:
        # 4b. The image: an upload is stored, a reference is passed on as its key.
        key = key or await store_upload(ingress, data)
        payload["svd"] = {**svd_request, "image_key": key}
        kind = "videos.image_to_video"

    record = await asyncio.to_thread(ingress.create_and_enqueue, kind, payload, stages)
    view = video_view(ingress, record, request)
    return JSONResponse(view.model_dump(mode="json"), status_code=202,
                        headers={"Location": f"/v1/videos/{record.id}"})


# --- video objects -------------------------------------------------------------------------------


def video_record(ingress, video_id: str) -> JobRecord:
    """The job of a video; a job that is not a video is as unknown as no job at all."""
    try:
        record = ingress.jobs.get_with_cancel(video_id)
    except JobNotFoundError:
        record = None
    if record is None or record.kind not in VIDEO_KINDS:
        raise NotFoundError(f"no video with id {video_id!r}", "video_id")
    return record


def _output(record: JobRecord, role: str):
    return next((o for o in record.outputs if o.extra.get("role") == role), None)


def video_view(ingress, record: JobRecord, request: Request) -> VideoObject:
    spec = record.request
    video, poster = _output(record, "video"), _output(record, "thumbnail")
    return VideoObject(
        id=record.id, model=spec["model"], status=record.status, progress=int(record.progress),
        created_at=int(record.created_at),
        completed_at=int(record.finished_at) if record.finished_at else None,
        prompt=(record.result or {}).get("prompt") or spec.get("prompt"), seconds=spec["seconds"],
        size=spec["size"], error=VideoError(code=record.error.type, message=record.error.message) if record.error else None,
        kind=record.kind, stage=record.stage, stages=record.stages, stage_progress=record.stage_progress,
        num_frames=spec["num_frames"], fps=spec["fps"], seed=spec.get("seed"),
        video_url=ingress.url_for(video.key, request) if video else None,
        thumbnail_url=ingress.url_for(poster.key, request) if poster else None,
        result=record.result,
    )


@router.get("/v1/videos", response_model=VideoList)
async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc", ingress=Depends(current_ingress)) -> VideoList:
    def page() -> tuple[list[JobRecord], bool]:
        ids = ingress.jobs.list_ids()  # newest first; ids sort by creation time
        if order == "asc":
            ids = [i for i in reversed(ids) if after is None or i > after]
        elif after is not None:
            ids = [i for i in ids if i < after]
        records = []
        for job_id in ids:
            try:
                record = ingress.jobs.get(job_id)
            except (JobNotFoundError, ValueError):
                continue  # deleted or unreadable since listing
            if record.kind in VIDEO_KINDS:
                records.append(record)
                if len(records) > limit:
                    break
        return records[:limit], len(records) > limit

    records, has_more = await asyncio.to_thread(page)
    views = [video_view(ingress, r, request) for r in records]
    return VideoList(data=views, has_more=has_more, first_id=views[0].id if views else None,
                     last_id=views[-1].id if views else None)


@router.get("/v1/videos/{video_id}", response_model=VideoObject)
async def get_video(video_id: str, request: Request, ingress=Depends(current_ingress)) -> VideoObject:
    return video_view(ingress, await asyncio.to_thread(video_record, ingress, video_id), request)


@router.get("/v1/videos/{video_id}/content",
            responses={200: {"content": {"video/mp4": {}, "image/png": {}}}, 409: {"model": ErrorResponse}})
async def get_video_content(video_id: str, variant: Literal["video", "thumbnail", "spritesheet"] = "video",
                            ingress=Depends(current_ingress)):
    record = await asyncio.to_thread(video_record, ingress, video_id)
    if variant == "spritesheet":
        raise InvalidRequestError("variant 'spritesheet' is not available; use 'video' or 'thumbnail'", "variant")
    if record.status in ("failed", "cancelled"):
        raise NotFoundError(f"video {video_id} is {record.status} and has no content", "video_id")
    if record.status != "completed":
        raise ConflictError(
            f"video {video_id} is {record.status} ({int(record.progress)}%, stage {record.stage or 'none yet'}); "
            "its content is available once its status is completed", "video_id")
    output = _output(record, "video" if variant == "video" else "thumbnail")
    if output is None:
        raise NotFoundError(f"video {video_id} has no {variant}", "variant")
    # Streams from storage, or redirects (307) to a presigned URL when storage is S3.
    response = await asyncio.to_thread(ingress.get_file, output.key)
    extension = "mp4" if variant == "video" else "png"
    response.headers["Content-Disposition"] = f'inline; filename="{video_id}.{extension}"'
    return response


@router.post("/v1/videos/{video_id}/cancel", response_model=VideoObject)
async def cancel_video(video_id: str, request: Request, ingress=Depends(current_ingress)) -> VideoObject:
    def cancel() -> JobRecord:
        video_record(ingress, video_id)
        return ingress.jobs.request_cancel(video_id)  # the runner stops at its next step

    return video_view(ingress, await asyncio.to_thread(cancel), request)


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={409: {"model": ErrorResponse}})
async def delete_video(video_id: str, ingress=Depends(current_ingress)) -> VideoDeleted:
    record = await asyncio.to_thread(video_record, ingress, video_id)
    if not record.is_terminal:
        # The runner owns a running job's record: ask it to stop, and delete once it has.
        await asyncio.to_thread(ingress.jobs.request_cancel, video_id)
        deadline = time.monotonic() + DELETE_WAIT_S
        while not record.is_terminal and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            record = await asyncio.to_thread(ingress.jobs.get, video_id)
        if not record.is_terminal:
            raise ConflictError(f"video {video_id} is still stopping after cancel; delete it again shortly",
                                "video_id")
    await asyncio.to_thread(_delete_files_and_record, ingress, record)
    return VideoDeleted(id=video_id)


def _delete_files_and_record(ingress, record: JobRecord) -> None:
    """The job's outputs, the intermediates of its stages and its upload; never a referenced output."""
    keys = {output.key for output in record.outputs}
    for stage in ((record.result or {}).get("stages") or {}).values():
        keys.update(k for k in [stage.get("key"), stage.get("poster_key"), *(stage.get("keys") or [])] if k)
    source = (record.request.get("svd") or {}).get("image_key")
    if source and source.startswith("uploads/"):
        keys.add(source)
    for key in keys:
        ingress.storage.delete(key)
    ingress.jobs.delete(record.id)


# --- POST /v1/images/upscale ---------------------------------------------------------------------


@router.post("/v1/images/upscale", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="x4 an image with the Stable Diffusion upscaler",
             responses={202: {"model": JobView, "description": "Accepted as a job (?async=true)."}},
             openapi_extra=_body_schema(ImageUpscaleRequest))
async def upscale_image(request: Request, async_: bool = Query(False, alias="async"),
                        ingress=Depends(current_ingress)):
    fields, files = await read_body(ingress, request)
    upload = files.pop("image", None)
    if files:
        raise InvalidRequestError(f"unexpected file field {next(iter(files))!r}", next(iter(files)))
    body = ImageUpscaleRequest.model_validate(fields)
    info = await ingress.model_info("upscaler")
    check_model(info, body.model)
    seed = body.seed if body.seed is not None else random_seed()
    spec = upscale_spec(info, body.steps, body.noise_level, seed)
    key, data, image = await load_image(ingress, {"image": upload, "image_key": body.image_key,
                                                  "image_url": body.image_url})
    if image is None:
        raise InvalidRequestError("give an image: a file `image`, or `image_key` or `image_url`", "image")
    param = "image" if upload is not None else "image_key" if body.image_key else "image_url"
    check_upscalable(info, image.width, image.height, param)

    if _wants_async(request, async_):
        key = key or await store_upload(ingress, data)
        payload = {"upscale": {**spec, "prompt": body.prompt, "image_key": key}}
        return await ingress.submit_job("images.upscale", payload, request, ["upscale"])
    store = body.response_format == "url"
    upscale = UpscaleRequest(image=data, image_key=key, prompt=body.prompt, **spec, store=store,
                             output_id=new_id("img") if store else None)
    result: UpscaleResponse = await ingress.handles["upscaler"].upscale.remote(upscale)
    item = (ImageData(url=ingress.url_for(result.key, request), seed=result.seed) if store
            else ImageData(b64_json=base64.b64encode(result.png).decode(), seed=result.seed))
    return ImagesResponse(created=int(time.time()), data=[item], model=result.model,
                          size=f"{result.width}x{result.height}", steps=result.steps,
                          elapsed_s=round(result.elapsed_s, 4))


# --- text-to-image-hd: POST /v1/images/generations with "upscale": true ----------------------------


async def generate_hd(ingress, body: ImageGenerationRequest, sdxl_request: SDXLRequest, refine: dict | None,
                      request: Request, run_async: bool):
    """SDXL → x4 upscaler. SDXL stores its images and the upscaler reads them by key, so the
    stills never pass through the ingress; each image is upscaled with its own seed."""
    info = await ingress.model_info("upscaler")
    check_upscalable(info, sdxl_request.width, sdxl_request.height, "size")
    if run_async:
        payload = {**ingress._sdxl_payload(sdxl_request), "refine": refine,
                   "upscale": upscale_spec(info, None, None, None)}
        stages = (["refine"] if refine else []) + ["generate", "upscale"]
        return await ingress.submit_job("images.text_to_image_hd", payload, request, stages)

    refined = None
    if refine is not None:
        refined = await text_api.refine_prompt(ingress, RefineRequest.model_validate(refine["request"]))
        sdxl_request = SDXLRequest.model_validate(apply_refined(sdxl_request.model_dump(), refined))
    sdxl_request.store, sdxl_request.output_id = True, new_id("img")
    generated = await routed(ingress.sdxl, sdxl_request).generate.remote(sdxl_request)
    store = body.response_format == "url"
    upscaler = ingress.handles["upscaler"]
    results: list[UpscaleResponse] = await asyncio.gather(*(
        upscaler.upscale.remote(UpscaleRequest(
            image_key=image.key, prompt=generated.prompt, seed=image.seed, store=store,
            output_id=f"{sdxl_request.output_id}.hd-{i}" if store else None))
        for i, image in enumerate(generated.images)))
    data = [
        ImageData(url=ingress.url_for(r.key, request), seed=r.seed, revised_prompt=generated.prompt) if store
        else ImageData(b64_json=base64.b64encode(r.png).decode(), seed=r.seed, revised_prompt=generated.prompt)
        for r in results
    ]
    return ImagesResponse(created=int(time.time()), data=data, model=f"{generated.model}+{results[0].model}",
                          size=f"{results[0].width}x{results[0].height}", steps=generated.steps,
                          elapsed_s=round(generated.elapsed_s + sum(r.elapsed_s for r in results), 4),
                          refine=refined.model_dump() if refined else None)
