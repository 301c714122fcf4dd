"""HTTP request and response models. Shapes follow OpenAI's where OpenAI has one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.sdxl.deployment import MAX_SEED, ImageCount, Prompt


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ImageGenerationRequest(BaseModel):
    """`POST /v1/images/generations`: OpenAI's Images shape plus diffusion controls."""

    model_config = ConfigDict(extra="forbid")

    prompt: Prompt
    model: str | None = None
    n: ImageCount = Field(1, description="1, 2, 4 or 8 images.")
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8 within the model's limits.")
    response_format: Literal["url", "b64_json"] = "url"
    negative_prompt: str | None = Field(None, max_length=4000)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Image i uses seed + i.")
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    style: str | None = Field(None, description="A style preset from GET /v1/models (styles).")
    lora: str | None = Field(None, description="A registered LoRA from GET /v1/models: 'name' (latest) or "
                                               "'name:version'. Its trigger word is added when absent.")
    lora_scale: float = Field(1.0, ge=0, le=4, description="The LoRA's weight.")
    refine: bool = Field(False, description="Rewrite the prompt with Gemma first; the result is revised_prompt.")
    upscale: bool = Field(False, description="Text-to-image-hd: x4 every image with the upscaler.")
    # OpenAI fields accepted for compatibility and not used by diffusion models.
    quality: str | None = None
    user: str | None = None

    @field_validator("style")
    @classmethod
    def _openai_styles_are_no_preset(cls, style: str | None) -> str | None:
        return None if style in ("vivid", "natural") else style


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None
    seed: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str | None = None
    size: str | None = None
    steps: int | None = None
    elapsed_s: float | None = None
    batch_images: int | None = Field(None, description="Images in the pipeline call these ran in (batching).")
    refine: dict | None = Field(None, description="With refine: true, what Gemma wrote (and any warning).")


class JobOutputView(BaseModel):
    key: str
    url: str
    content_type: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="Role, workflow node and lineage of the output.")


class JobView(BaseModel):
    id: str
    object: Literal["job"] = "job"
    kind: str
    status: str
    progress: float
    stage: str | None = None
    stages: list[str] = []
    stage_progress: float = 0.0
    step: int | None = None
    total_steps: int | None = None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    params: dict[str, Any] = Field(default_factory=dict, description="The job's inputs (prompt, seed, model, "
                                                                     "LoRA...): its lineage, for reuse.")
    outputs: list[JobOutputView] = []
    result: dict[str, Any] | None = None
    error: ErrorDetail | None = None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobView]
    has_more: bool = False
    last_id: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "atelier"
    kind: str
    capabilities: list[str] = []
    metadata: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- videos (OpenAI's Videos API shapes) and upscaling -----------------------------------------


class ImageReference(BaseModel):
    """OpenAI's image reference object: `image_url` is a URL of this server's files
    (`…/v1/files/outputs/…`) or a `data:` URL; `file_id` is the storage key of an output."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = None
    file_id: str | None = None


class VideoCreateRequest(BaseModel):
    """`POST /v1/videos` (JSON, or multipart with `input_reference` as a file).

    With an input image it is image-to-video (SVD); with only a prompt it is text-to-video
    (SDXL still → optional x4 upscale → SVD). Frame count and rate are checked against the
    model's limits by the router, so an out-of-range value names its field.
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, max_length=4000, description="Required for text-to-video.")
    input_reference: ImageReference | str | None = Field(
        None, description="The image to animate: a file upload (multipart), or a reference object or URL.")
    input_reference_key: str | None = Field(None, description="Storage key of a stored output (outputs/…).")
    model: str | None = Field(None, description="The video model; only the deployed one (GET /v1/models).")
    seconds: float | None = Field(None, gt=0, description="Duration; num_frames = round(seconds * fps).")
    num_frames: int | None = Field(None, description="Overrides seconds; 1 to the model's limit.")
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


class ImageUpscaleRequest(BaseModel):
    """`POST /v1/images/upscale` as JSON; multipart sends the image as the file `image` instead."""

    model_config = ConfigDict(extra="forbid")

    image_key: str | None = Field(None, description="Storage key of a stored output (outputs/…).")
    image_url: str | None = Field(None, description="URL of this server's files, or a data: URL.")
    model: str | None = None
    prompt: str = Field("", max_length=4000, description="Guides the upscaler; empty runs it unguided.")
    steps: int | None = Field(None, ge=1)
    noise_level: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    response_format: Literal["url", "b64_json"] = "url"
