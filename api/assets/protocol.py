"""The asset API's shapes: a job as an asset (its tags, favourite, bytes), a search page, an edit,
statistics by kind, a delete's report and a retention run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.jobs.protocol import JobOutputView, JobView


class AssetOutputView(JobOutputView):
    tags: list[str] = Field(default_factory=list, description="This output's own tags.")
    favorite: bool = Field(False, description="A favourite: this output, or its whole job.")


class AssetView(JobView):
    outputs: list[AssetOutputView] = []
    tags: list[str] = Field(default_factory=list, description="The job's own tags (each output has its own too).")
    favorite: bool = Field(False, description="The whole job is a favourite (each output says whether it is one).")
    bytes: int = Field(0, description="Bytes of the job's files (counted when the index read it).")


class AssetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AssetView]
    has_more: bool = False
    last_id: str | None = None


class AssetEditRequest(BaseModel):
    """Any of: the whole tag list, tags to add or remove, the favourite flag; of the job, or of one
    output with `output`."""

    model_config = ConfigDict(extra="forbid")

    output: int | None = Field(None, ge=0, description="Edit this output's tags and favourite (its index in the "
                                                       "job's outputs) instead of the job's.")
    tags: list[str] | None = Field(None, max_length=20, description="Replaces the tags.")
    add_tags: list[str] = Field(default_factory=list, max_length=20)
    remove_tags: list[str] = Field(default_factory=list, max_length=20)
    favorite: bool | None = None


class KindStats(BaseModel):
    jobs: int
    outputs: int
    bytes: int
    favorites: int = Field(description="Jobs that are, or have an output that is, a favourite.")


class AssetStats(BaseModel):
    object: Literal["asset.stats"] = "asset.stats"
    by_kind: dict[str, KindStats]
    total: KindStats


class TagCount(BaseModel):
    tag: str
    count: int


class TagList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TagCount]


class JobDeleted(BaseModel):
    id: str
    object: Literal["job.deleted"] = "job.deleted"
    deleted: bool = True
    files_deleted: list[str] = Field(default_factory=list)
    files_kept: list[str] = Field(default_factory=list, description="Shared files another job still uses.")


class RetentionRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dry_run: bool = Field(True, description="Report what would go without deleting anything.")


class RetentionView(BaseModel):
    object: Literal["asset.retention"] = "asset.retention"
    enabled: bool
    dry_run: bool
    interval_s: float
    policy: dict[str, Any]
    last_run: dict[str, Any] | None = Field(None, description="The latest report: a run here or the sweeper's.")
