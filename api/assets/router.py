"""The asset library: GET /v1/assets (search), GET /v1/assets/stats, GET /v1/assets/tags,
GET|PUT /v1/jobs/{id}/asset (tags, favourite), DELETE /v1/jobs/{id} (the job and its files),
GET|POST /v1/assets/retention (the policy and its last report; a dry run or an apply: admin)."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from api.assets.protocol import (AssetEditRequest, AssetList, AssetStats, AssetView, JobDeleted, RetentionRunRequest,
                                 RetentionView, TagList)
from api.assets.service import AssetsService
from api.auth import granted_scopes
from api.errors_protocol import ErrorResponse

router = APIRouter(tags=["assets"])
FORBIDDEN = {403: {"model": ErrorResponse, "description": "The key lacks the scope (retention: admin)."}}


def assets_service(request: Request) -> AssetsService:
    return request.app.state.assets


def base_url(request: Request) -> str:
    return str(request.base_url)


@router.get("/v1/assets", response_model=AssetList)
async def search_assets(
        request: Request,
        q: str | None = Query(None, max_length=200, description="Words of the prompt or tags (prefixes match)."),
        kind: str | None = Query(None, max_length=100), model: str | None = Query(None, max_length=300),
        lora: str | None = Query(None, max_length=300, description="'name' (any version) or 'name:version'."),
        tag: str | None = Query(None, max_length=100), favorite: bool | None = None,
        status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] | None = None,
        created_after: datetime | None = Query(None, description="ISO 8601 or epoch seconds."),
        created_before: datetime | None = Query(None, description="ISO 8601 or epoch seconds."),
        after: str | None = Query(None, max_length=200), limit: int = Query(50, ge=1, le=100),
        assets: AssetsService = Depends(assets_service)) -> AssetList:
    return await asyncio.to_thread(
        assets.search, base_url(request), q=q, kind=kind, model=model, lora=lora, tag=tag, favorite=favorite,
        status=status, created_after=created_after, created_before=created_before, after=after, limit=limit)


@router.get("/v1/assets/stats", response_model=AssetStats)
async def asset_stats(assets: AssetsService = Depends(assets_service)) -> AssetStats:
    return await asyncio.to_thread(assets.stats)


@router.get("/v1/assets/tags", response_model=TagList)
async def asset_tags(assets: AssetsService = Depends(assets_service)) -> TagList:
    return await asyncio.to_thread(assets.tags)


@router.get("/v1/assets/retention", response_model=RetentionView, responses=FORBIDDEN)
def retention(assets: AssetsService = Depends(assets_service)) -> RetentionView:
    return assets.retention_view()


@router.post("/v1/assets/retention", responses=FORBIDDEN)
async def run_retention(body: RetentionRunRequest, assets: AssetsService = Depends(assets_service)) -> dict[str, Any]:
    return await asyncio.to_thread(assets.run_retention, body.dry_run)


@router.get("/v1/jobs/{job_id}/asset", response_model=AssetView)
def get_asset(job_id: str, request: Request, assets: AssetsService = Depends(assets_service)) -> AssetView:
    return assets.get(job_id, base_url(request))


@router.put("/v1/jobs/{job_id}/asset", response_model=AssetView)
def edit_asset(job_id: str, body: AssetEditRequest, request: Request,
               assets: AssetsService = Depends(assets_service)) -> AssetView:
    return assets.edit(job_id, body, base_url(request))


@router.delete("/v1/jobs/{job_id}", response_model=JobDeleted, responses={**FORBIDDEN, 409: {
    "model": ErrorResponse, "description": "The job is still running: cancel it first."}})
async def delete_job(job_id: str, request: Request, assets: AssetsService = Depends(assets_service)) -> JobDeleted:
    return await assets.delete_async(job_id, granted_scopes(request))
