"""Videos API types: OpenAI's video job shapes (POST /v1/videos, GET /v1/videos/{id})."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.images.protocol import ImageReference
from deployments.sdxl.contract import MAX_SEED


class VideoCreateRequest(BaseModel):
    """`POST /v1/videos` (JSON, or multipart with `input_reference` as a file).

    With an input image it is image-to-video (SVD); with only a prompt it is text-to-video
    (SDXL still → optional x4 upscale → SVD). Frame count and rate are checked against the
    model's limits by the service, so an out-of-range value names its field.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=4000, description="Required for text-to-video.")
    input_reference: ImageReference | str | None = Field(
        None, description="The image to animate: a file upload (multipart), or a reference object or URL.")
    input_reference_key: str | None = Field(None, description="Storage key of a stored output (outputs/…).")
    model: str | None = Field(None, description="The video model; only the deployed one (GET /v1/models).")
    seconds: float | None = Field(None, gt=0, description=(
        "Duration, up to the model's max_seconds (GET /v1/models; 30 by default); num_frames = round(seconds * fps). "
        "Longer than one clip (max_num_frames), the video is chained from clips, each starting from the one "
        "before, crossfaded where they join."))
    num_frames: int | None = Field(None, description="Overrides seconds; 1 to the model's limit (one clip).")
    fps: int | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT of the animation (before any video upscale).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="One seed for every stage.")
    motion_bucket_id: int | None = Field(None, ge=0, le=255)
    noise_aug_strength: float | None = Field(None, ge=0, le=1)
    decode_chunk_size: int | None = Field(None, ge=1)
    steps: int | None = Field(None, ge=1, description="SVD denoising steps.")
    # text-to-video: the still
    image_size: str | None = Field(None, description="Size of the SDXL still; default: size, or a quarter of "
                                                     "it (at least SDXL's minimum) with upscale.")
    image_steps: int | None = Field(None, ge=1, description="SDXL denoising steps.")
    negative_prompt: str | None = Field(None, max_length=4000)
    style: str | None = None
    preset: str | None = Field(None, description="A video preset of yours (GET /v1/presets?kind=video): its "
                                                 "seconds, fps, motion, noise, size and steps, where not given here.")
    refine: bool = Field(False, description="text-to-video: rewrite the prompt with Gemma first.")
    # upscaling
    upscale: bool = Field(False, description="text-to-video: x4 the still before animating it; "
                                             "image-to-video: x4 the video.")
    upscale_video: bool = Field(False, description="x4 the video after SVD (text-to-video too).")
    upscale_steps: int | None = Field(None, ge=1)
    noise_level: int | None = Field(None, ge=0, description="Upscaler noise level.")


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """OpenAI's Video object, plus Atelier's stage progress and download URLs."""

    id: str
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int = Field(description="0 to 100 over the whole pipeline.")
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    seconds: str
    size: str = Field(description="WIDTHxHEIGHT of the video you download.")
    error: VideoError | None = None
    # Atelier extras
    kind: str
    stage: str | None = None
    stages: list[str] = []
    stage_progress: float = 0.0
    num_frames: int
    fps: int
    seed: int | None = None
    video_url: str | None = None
    thumbnail_url: str | None = None
    result: dict[str, Any] | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
