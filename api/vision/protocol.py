"""Vision API types: POST /v1/images/judge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from deployments.sdxl.contract import MAX_SEED, Prompt


class JudgeImage(BaseModel):
    """One image to judge: a file of this server, or the image itself."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, max_length=1024, description="A stored output (outputs/…), a dataset image "
                                                              "(datasets/<id>/images/…), or its /v1/files/ URL.")
    b64_json: str | None = Field(None, description="The image (PNG, JPEG or WebP), base64.")


class JudgeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    images: list[JudgeImage] = Field(min_length=1, max_length=64, description="The images, judged one by one.")
    prompt: Prompt = Field(description="The prompt the images were made for.")
    criteria: str | None = Field(None, description="More to judge by, e.g. 'the logo is legible'.")
    model: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="For sampling judges (temperature > 0).")


class JudgedImage(BaseModel):
    index: int
    key: str | None = Field(None, description="The image's key, when it was given by key.")
    score: int = Field(description="1 (unusable) to 10 (perfect).")
    reasons: list[str]
    defects: list[str]
    matches_prompt: bool


class JudgeResponse(BaseModel):
    data: list[JudgedImage]
    model: str
