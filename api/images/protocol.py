"""Images API types: OpenAI's Images shapes plus diffusion controls, and the x4 upscale request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from deployments.sdxl.contract import MAX_SEED, ImageCount, Prompt


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
    best_of: int | None = Field(None, ge=1, description="Generate this many candidates, judge each against the "
                                                        "prompt with the language model, return the top n ranked "
                                                        "(n <= best_of <= the server's max_best_of). The others "
                                                        "stay in the job's record (job_id).")
    criteria: str | None = Field(None, max_length=4000, description="With best_of: what else the judge looks for.")
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
    # With best_of: the judge's verdict on this image (1 to 10), best first.
    score: int | None = None
    reasons: list[str] | None = None
    defects: list[str] | None = None
    matches_prompt: bool | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    model: str | None = None
    size: str | None = None
    steps: int | None = None
    elapsed_s: float | None = None
    batch_images: int | None = Field(None, description="Images in the pipeline call these ran in (batching).")
    refine: dict | None = Field(None, description="With refine: true, what Gemma wrote (and any warning).")
    job_id: str | None = Field(None, description="With best_of: the job that made and judged every candidate "
                                                 "(GET /v1/jobs/{job_id}: result.best_of).")


class ImageReference(BaseModel):
    """OpenAI's image reference object: `image_url` is a URL of this server's files
    (`…/v1/files/outputs/…`) or a `data:` URL; `file_id` is the storage key of an output."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = None
    file_id: str | None = None


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
