"""The job API's views: a job, its outputs, a page of jobs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from api.errors_protocol import ErrorDetail


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
