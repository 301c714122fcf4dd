"""Videos (OpenAI's Videos API shapes): check a request against the models' contracts, enqueue
the job that runs every stage, and read videos back from their job records.

With an input image, a video is image-to-video (SVD, then optionally a x4 video upscale); with
only a prompt it is text-to-video (optional Gemma refine → SDXL → optional x4 upscale of the
still → SVD). The pipelines are in graphs/video_pipelines.py. Everything is checked here, by
each model's one `check()` against the limits fixed when the app was built, so bad input is a
400 naming the field, and a job fails only for reasons that could not be seen up front.

`seconds` may ask for more than one SVD clip, up to the model's `max_seconds`: the job then
chains clips (`SVDChain`, pinned in its payload), and the rate limiter charges all of them.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Literal

from api.auth import caller
from api.files.service import FilesService
from api.images.protocol import ImageGenerationRequest
from api.images.service import ImagesService
from api.jobs.service import JobsService
from api.models.service import ModelsService
from api.presets.service import PresetsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter, video_cost
from api.text.service import TextService
from api.uploads import Uploads
from api.videos.protocol import VideoCreateRequest, VideoDeleted, VideoError, VideoList, VideoObject
from api.vision.service import VisionService
from deployments.diffusion import random_seed
from deployments.errors import ConflictError, InvalidRequestError, NotFoundError
from deployments.media import parse_size
from deployments.sdxl.contract import SDXLRequest
from deployments.svd import contract as svd_contract
from deployments.svd.contract import SVDChain, SVDLimits, SVDRequest
from deployments.upscaler import contract as upscaler_contract
from deployments.upscaler.contract import UpscaleMedia, UpscalerLimits, UpscaleRequest
from graphs.payloads import (
    VIDEO_KINDS,
    ImageToVideoPayload,
    TextToVideoPayload,
    parse_record,
    video_source_key,
)
from storage.fs import Storage
from storage.jobs import JobNotFoundError, JobOutput, JobRecord, JobStore

DELETE_WAIT_S = 10.0  # how long DELETE waits for a cancelled video to stop before answering 409


def seconds_of(num_frames: int, fps: int) -> str:
    return f"{num_frames / fps:.2f}".rstrip("0").rstrip(".")


def still_size(video_size: tuple[int, int], upscale: bool, scale: int, sdxl_min_size: int) -> tuple[int, int]:
    """The SDXL still for a video: its size, or, when the still is upscaled, 1/scale of it, grown
    evenly to SDXL's minimum side (SVD crops it to the video's shape)."""
    width, height = video_size
    if not upscale:
        return width, height
    width, height = width / scale, height / scale
    grow = max(1.0, sdxl_min_size / min(width, height))
    return math.ceil(width * grow / 8) * 8, math.ceil(height * grow / 8) * 8


def upscale_spec(request: UpscaleRequest) -> dict[str, Any]:
    """The upscale settings a video job stores (its stages add the input and the prompt)."""
    return {"steps": request.steps, "noise_level": request.noise_level, "seed": request.seed}


def _output(record: JobRecord, role: str) -> JobOutput | None:
    return next((o for o in record.outputs if o.extra.get("role") == role), None)


class VideosService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)
    presets: "PresetsService | None" = None  # the caller's video presets (build_services sets them)
    vision: "VisionService | None" = None  # prompt moderation (build_services sets it)

    def __init__(self, models: ModelsService, images: ImagesService, text: TextService, jobs: JobsService,
                 store: JobStore, files: FilesService, uploads: Uploads, storage: Storage,
                 delete_wait_s: float = DELETE_WAIT_S):
        self.models = models  # the deployed models' limits; a model not deployed is a 404
        self.images = images  # the SDXL still of text-to-video, checked as POST /v1/images/generations does
        self.text = text  # the refine stage's chat body
        self.jobs = jobs
        self.store = store  # the job records a video is read from
        self.files = files
        self.uploads = uploads
        self.storage = storage  # a deleted video's files
        self.delete_wait_s = delete_wait_s

    # --- POST /v1/videos ----------------------------------------------------------------------------

    async def create(self, body: VideoCreateRequest, upload: bytes | None, base_url: str) -> VideoObject:
        """Check the request against every model it needs, then enqueue one job for all its stages.
        `upload`: the `input_reference` file of a multipart request."""
        preset = await self.presets.video_preset(body.preset) if self.presets else None
        if preset is not None:  # the preset's settings, where the request does not give its own
            given = set(body.model_fields_set)
            if given & {"seconds", "num_frames"}:  # the request's length, in either unit, wins whole
                given |= {"seconds", "num_frames"}
            fields = ("seconds", "num_frames", "fps", "motion_bucket_id", "noise_aug_strength", "size", "steps")
            body = body.model_copy(update={field: getattr(preset, field) for field in fields
                                           if field not in given and getattr(preset, field) is not None})
        # 1. The video model's limits: frames, rate, size, steps.
        svd: SVDLimits = self.models.limits_of("svd")
        width, height = parse_size(body.size) if body.size else (svd.default_width, svd.default_height)
        seed = body.seed if body.seed is not None else random_seed()  # one seed for every stage, recorded
        checked = SVDRequest(
            model=body.model, num_frames=body.num_frames, seconds=body.seconds, fps=body.fps, width=width,
            height=height, steps=body.steps, seed=seed, decode_chunk_size=body.decode_chunk_size)
        svd_contract.check(checked, svd, chain=True)  # seconds past one clip: a chain of clips
        num_frames, fps = svd_contract.num_frames_of(checked, svd), svd_contract.fps_of(checked, svd)
        chain = svd.chain() if num_frames > svd.max_num_frames else None
        # Every clip is charged, the frames their crossfades overlap included.
        made = sum(clip.num_frames for clip in chain.plan(num_frames, seed)) if chain else num_frames
        self.rate.charge(video_cost(made, checked.steps, svd.default_steps), "seconds")

        # 2. The source: an image (image-to-video) or a prompt (text-to-video).
        key, data, image = await self.uploads.load_image({
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
        up: UpscalerLimits | None = None
        upscale: UpscaleRequest | None = None
        if upscale_still or upscale_video:
            up = self.models.limits_of("upscaler")
            upscale = UpscaleRequest(steps=body.upscale_steps, noise_level=body.noise_level, seed=seed)
            video = UpscaleMedia(width=width, height=height, num_frames=num_frames, what="the video",
                                 param="upscale_video" if body.upscale_video else "upscale") if upscale_video else None
            upscaler_contract.check(upscale, up, video, steps_param="upscale_steps")
        final_size = (width * up.scale, height * up.scale) if upscale_video else (width, height)

        svd_section = {
            "num_frames": num_frames, "fps": fps, "width": width, "height": height, "seed": seed,
            "steps": body.steps, "decode_chunk_size": body.decode_chunk_size,
            **{name: getattr(body, name) for name in ("motion_bucket_id", "noise_aug_strength")
               if getattr(body, name) is not None},
        }
        summary: dict[str, Any] = {
            "model": svd.model, "prompt": body.prompt, "size": f"{final_size[0]}x{final_size[1]}",
            "seconds": seconds_of(num_frames, fps), "num_frames": num_frames, "fps": fps, "seed": seed,
            "upscale_video": upscale_spec(upscale) if upscale_video else None,
        }
        if self.vision is not None:  # a refused prompt is a 400 before anything runs
            await self.vision.check_prompt(body.prompt, "prompt")
        stages = ["video"] + (["upscale_video"] if upscale_video else [])
        if text_to_video:
            # 4a. The still: SDXL's limits (and the upscaler's, when it is upscaled), Gemma if asked.
            sdxl_request, refine = await self._still(body, seed, (width, height), upscale_still, up, upscale)
            payload = text_to_video_payload(summary, sdxl_request, refine,
                                            upscale_spec(upscale) if upscale_still else None, svd_section, chain,
                                            self.vision.moderation_spec() if self.vision is not None else None)
            stages = (["refine"] if refine else []) + ["generate"] + (["upscale"] if upscale_still else []) + stages
        else:
            # 4b. The image: an upload is stored, a reference is passed on as its key.
            key = key or await self.uploads.store(data)
            payload = image_to_video_payload(summary, {**svd_section, "image_key": key}, chain)

        record = await self.jobs.submit_async(payload, stages)
        return self.view(record, base_url)

    async def _still(self, body: VideoCreateRequest, seed: int, video_size: tuple[int, int], upscale_still: bool,
                     up: UpscalerLimits | None, upscale: UpscaleRequest | None) -> tuple[SDXLRequest, dict | None]:
        """Text-to-video's SDXL request for the still (checked by SDXL's contract, and by the
        upscaler's when the still is upscaled) and its refine stage, if asked."""
        if body.image_size:
            image_w, image_h = parse_size(body.image_size, "image_size")
        else:
            image_w, image_h = still_size(video_size, upscale_still, up.scale if up else 4, self.models.sdxl.min_size)
        still = ImageGenerationRequest(
            prompt=body.prompt, size=f"{image_w}x{image_h}", steps=body.image_steps, seed=seed,
            negative_prompt=body.negative_prompt, style=body.style, refine=body.refine)
        try:
            sdxl_request = await self.images.sdxl_request(still, mode="text_to_image")
        except InvalidRequestError as exc:
            if exc.param != "size" or not body.image_size:
                raise
            # The still's size is this request's image_size: the same refusal, naming that field.
            raise InvalidRequestError("image_size" + exc.message.removeprefix("size"), "image_size") from None
        if upscale_still:
            upscaler_contract.check(upscale, up, UpscaleMedia(
                width=image_w, height=image_h, what="the still", param="image_size" if body.image_size else "upscale"))
        refine = (await self.text.refine_payload(still.prompt, still.style, still.lora, still.seed)
                  if body.refine else None)
        return sdxl_request, refine

    # --- video objects ------------------------------------------------------------------------------

    def record(self, video_id: str) -> JobRecord:
        """The job of a video; a job that is not a video is as unknown as no job at all."""
        try:
            record = self.store.get_with_cancel(video_id)
        except JobNotFoundError:
            record = None
        if record is None or record.kind not in VIDEO_KINDS or not caller().sees(record.owner):
            raise NotFoundError(f"no video with id {video_id!r}", "video_id")
        return record

    def view(self, record: JobRecord, base_url: str) -> VideoObject:
        spec = parse_record(record)
        video, poster = _output(record, "video"), _output(record, "thumbnail")
        return VideoObject(
            id=record.id, model=spec.model, status=record.status, progress=int(record.progress),
            created_at=int(record.created_at),
            completed_at=int(record.finished_at) if record.finished_at else None,
            prompt=(record.result or {}).get("prompt") or spec.prompt, seconds=spec.seconds, size=spec.size,
            error=VideoError(code=record.error.type, message=record.error.message) if record.error else None,
            kind=record.kind, stage=record.stage, stages=record.stages, stage_progress=record.stage_progress,
            num_frames=spec.num_frames, fps=spec.fps, seed=spec.seed,
            video_url=self.files.url_for(video.key, base_url) if video else None,
            thumbnail_url=self.files.url_for(poster.key, base_url) if poster else None,
            result=record.result,
        )

    async def get(self, video_id: str, base_url: str) -> VideoObject:
        return self.view(await asyncio.to_thread(self.record, video_id), base_url)

    async def list(self, after: str | None, limit: int, order: Literal["asc", "desc"], base_url: str) -> VideoList:
        who = caller()

        def page() -> tuple[list[JobRecord], bool]:
            ids = self.store.list_ids()  # newest first; ids sort by creation time
            if order == "asc":
                ids = [i for i in reversed(ids) if after is None or i > after]
            elif after is not None:
                ids = [i for i in ids if i < after]
            records = []
            for job_id in ids:
                try:
                    record = self.store.get(job_id)
                except (JobNotFoundError, ValueError):
                    continue  # deleted or unreadable since listing
                if record.kind in VIDEO_KINDS and who.sees(record.owner):
                    records.append(record)
                    if len(records) > limit:
                        break
            return records[:limit], len(records) > limit

        records, has_more = await asyncio.to_thread(page)
        views = [self.view(r, base_url) for r in records]
        return VideoList(data=views, has_more=has_more, first_id=views[0].id if views else None,
                         last_id=views[-1].id if views else None)

    async def content_key(self, video_id: str, variant: Literal["video", "thumbnail", "spritesheet"]) -> str:
        """The storage key of a completed video's MP4 or poster PNG."""
        record = await asyncio.to_thread(self.record, video_id)
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
        return output.key

    async def cancel(self, video_id: str, base_url: str) -> VideoObject:
        def cancel() -> JobRecord:
            self.record(video_id)
            return self.store.request_cancel(video_id)  # the runner stops at its next step

        return self.view(await asyncio.to_thread(cancel), base_url)

    async def delete(self, video_id: str) -> VideoDeleted:
        """Cancels a running video, then deletes its files and record."""
        record = await asyncio.to_thread(self.record, video_id)
        if not record.is_terminal:
            # The runner owns a running job's record: ask it to stop, and delete once it has.
            await asyncio.to_thread(self.store.request_cancel, video_id)
            deadline = time.monotonic() + self.delete_wait_s
            while not record.is_terminal and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                record = await asyncio.to_thread(self.store.get, video_id)
            if not record.is_terminal:
                raise ConflictError(f"video {video_id} is still stopping after cancel; delete it again shortly",
                                    "video_id")
        await asyncio.to_thread(self._delete_files_and_record, record)
        return VideoDeleted(id=video_id)

    def _delete_files_and_record(self, record: JobRecord) -> None:
        """The job's outputs, the intermediates of its stages and its upload; never a referenced output."""
        keys = {output.key for output in record.outputs}
        for stage in ((record.result or {}).get("stages") or {}).values():
            keys.update(k for k in [stage.get("key"), stage.get("poster_key"), stage.get("handoff_key"),
                                    *(stage.get("keys") or [])] if k)
        source = video_source_key(record)
        # an upload its replays share stays while any other job names it
        if source and source.startswith("uploads/") and not self.store.referencing(source, exclude=[record.id]):
            keys.add(source)
        for key in keys:
            self.storage.delete(key)
        self.store.delete(record.id)


# --- the job payloads (stored as the ingress has always stored them) ------------------------------


def image_to_video_payload(summary: dict[str, Any], svd: dict[str, Any],
                           chain: SVDChain | None = None) -> ImageToVideoPayload:
    """`summary`: the Video object's fields and `upscale_video`; `svd`: the SVD section, with its
    image_key; `chain`, only for a video longer than one clip, after them."""
    return ImageToVideoPayload.create(**summary, svd=svd, **({"chain": chain} if chain else {}))


def text_to_video_payload(summary: dict[str, Any], sdxl: SDXLRequest, refine: dict | None,
                          upscale: dict[str, Any] | None, svd: dict[str, Any],
                          chain: SVDChain | None = None, moderation: dict | None = None) -> TextToVideoPayload:
    """The still's SDXL request (whole, as POST /v1/images/generations stores it), its refine stage
    and upscale settings, then the SVD section (its image_key is the still's, once it exists), and
    `chain` for a video longer than one clip, and `moderation` when the still is looked at first."""
    return TextToVideoPayload.create(**summary, sdxl=sdxl, refine=refine, upscale=upscale,
                                     svd={**svd, "image_key": None}, **({"chain": chain} if chain else {}),
                                     **({"moderation": moderation} if moderation else {}))
