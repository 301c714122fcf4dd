"""The datasets API's request and response types."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.llm.vision import CaptionStyle
from storage.datasets import DEFAULT_LICENSE, DatasetInfo


class DatasetCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique; letters, digits, '_', '.', '-' (no leading dot), at most 100.")
    description: str = Field("", max_length=2000)
    trigger_word: str | None = Field(None, max_length=100, description="Token that names the subject in captions.")
    license: str = Field(DEFAULT_LICENSE, max_length=200, description="Default license of added images.")
    public: bool = Field(False, description="Readable and trainable on by every key (read-only to all but its "
                                            "owner). Default: only the owner's keys see it.")


class DatasetView(DatasetInfo):
    object: Literal["dataset"] = "dataset"
    thumbnails: list[str] = Field(default_factory=list, description="URLs of up to 4 images of the latest version.")


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetView]


class DatasetDeleted(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    deleted: bool = True


class DatasetImportRequest(BaseModel):
    """Exactly one source: ``urls``, ``prefix``, ``job_ids`` or ``output_keys``."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] | None = Field(None, description="http(s) image URLs.")
    prefix: str | None = Field(None, description="A key prefix in the storage root, or an allowed s3:// or local prefix.")
    job_ids: list[str] | None = Field(None, description="Finished jobs whose image outputs to add (captioned with their prompt).")
    output_keys: list[str] | None = Field(None, description="Storage keys of generated images, under outputs/.")
    captions: dict[str, str] = Field(default_factory=dict, description="URL or output key -> caption.")
    tags: list[str] = Field(default_factory=list, max_length=100)
    license: str | None = Field(None, max_length=200)


class DatasetImage(BaseModel):
    id: str = Field(description="The image's sha256: what edits name.")
    key: str
    url: str
    thumbnail_url: str
    width: int
    height: int
    caption: str
    tags: list[str]
    source: str
    license: str
    filename: str
    size_bytes: int
    attribution: dict[str, Any] | None = None


class DatasetImageList(BaseModel):
    object: Literal["list"] = "list"
    dataset_id: str
    version: int
    latest_version: int
    total: int
    offset: int
    limit: int
    data: list[DatasetImage]


class DatasetEditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, description="The version edited: must be the latest (else 409).")
    remove: list[str] = Field(default_factory=list, max_length=10_000, description="Image ids to remove.")
    captions: dict[str, str] = Field(default_factory=dict, description="Image id -> new caption.")
    tags: dict[str, list[str]] = Field(default_factory=dict, description="Image id -> new tags (replacing them).")


class DatasetCaptionRequest(BaseModel):
    """POST /v1/datasets/{id}/captions: caption a version's images with the language model (a job)."""

    model_config = ConfigDict(extra="forbid")

    version: int | None = Field(None, ge=1, description="The version to caption. Default: the latest.")
    overwrite: bool = Field(False, description="false: images that have a caption keep it, and only the others "
                                               "are captioned; true: every image gets a new caption.")
    trigger_word: str | None = Field(None, max_length=100, description=(
        "Put first in each new caption when it is missing. Default: the dataset's trigger word; \"\" for none."))
    style: CaptionStyle = Field("sentence", description="tags: short comma-separated tags; sentence: one full sentence.")
    instruction: str | None = Field(None, min_length=1, max_length=1000,
                                    description="Asked instead of the style's own instruction.")
    max_images: int | None = Field(None, ge=1, le=100_000, description=(
        "Caption at most this many images in this job; a later job with overwrite false does the rest."))
