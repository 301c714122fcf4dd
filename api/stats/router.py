"""GET /v1/stats: jobs by kind and status, generation time by model (mean, p95), errors by kind,
recent failures with their causes, queue depth and replica counts."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from api.stats.protocol import Stats
from api.stats.service import StatsService

router = APIRouter(tags=["stats"])


def stats_service(request: Request) -> StatsService:
    return request.app.state.stats


@router.get("/v1/stats", response_model=Stats)
async def get_stats(window: int = Query(1000, ge=1, le=5000, description="How many recent jobs to read."),
                    stats: StatsService = Depends(stats_service)) -> Stats:
    return await stats.stats(window)
