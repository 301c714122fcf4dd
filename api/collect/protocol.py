"""The collect API's request and response types: sources, search, import into a dataset."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from storage.sources import RateLimit, SourceResult, SourceStatus


class SourceList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SourceStatus]


class CollectSearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    query: str = Field(max_length=200, description="What to search for; not empty.")
    sources: list[str] | None = Field(None, max_length=4, description="Source names; default: every available one.")
    page: int = Field(1, ge=1, le=1000)
    per_page: int = Field(20, ge=1, description="Per source; at most the source's max_per_page.")
    orientation: Literal["landscape", "portrait", "square"] | None = None
    color: str | None = Field(None, max_length=40, validation_alias=AliasChoices("color", "colour"),
                              description="A colour filter the sources know (see GET /v1/collect/sources).")


class SourcePageInfo(BaseModel):
    total: int
    total_pages: int | None = None
    results: int
    rate_limit: RateLimit


class SourceFailure(BaseModel):
    source: str
    type: str
    message: str
    reset_at: float | None = None


class CollectSearchResponse(BaseModel):
    object: Literal["list"] = "list"
    query: str
    page: int
    per_page: int
    data: list[SourceResult]
    sources: dict[str, SourcePageInfo] = Field(description="Per source: totals and its rate-limit headers.")
    errors: list[SourceFailure] = Field(default_factory=list, description="Sources that failed while others answered.")


class CollectImportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    result_ids: list[str] = Field(description="Ids of results a search here returned to this key's owner.")
    tags: list[str] = Field(default_factory=list, max_length=100)
