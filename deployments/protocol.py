"""HTTP request and response models. Shapes follow OpenAI's where OpenAI has one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.sdxl import MAX_SEED, ImageCount, Prompt


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
    lora: str | None = None
    refine: bool = Field(False, description="Rewrite the prompt with Gemma first; the result is revised_prompt.")
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
    refine: dict | None = Field(None, description="With refine: true, what Gemma wrote (and any warning).")


class JobOutputView(BaseModel):
    key: str
    url: str
    content_type: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None


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
