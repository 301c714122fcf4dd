"""GET /v1/stats: what the platform did lately, as JSON (the Monitor page charts it)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Timing(BaseModel):
    count: int
    mean_s: float
    p95_s: float


class Failure(BaseModel):
    id: str
    kind: str
    type: str
    message: str
    finished_at: float | None = None


class Stats(BaseModel):
    object: Literal["stats"] = "stats"
    window: int = Field(description="How many of the most recent jobs (the caller's; all for admin) were read.")
    jobs: dict[str, dict[str, int]] = Field(description="Jobs by kind, then by status.")
    generation_s: dict[str, Timing] = Field(description="Start-to-end time of completed jobs, by model (or kind).")
    errors: dict[str, dict[str, int]] = Field(description="Failed jobs by kind, then by error type.")
    recent_failures: list[Failure] = Field(description="The latest failed jobs, newest first, with their causes.")
    queue_depth: int = Field(description="Unfinished jobs, store-wide.")
    replicas: dict[str, dict[str, int]] | None = Field(
        None, description="Running replicas by application deployment, by state (None when Serve cannot be asked).")
