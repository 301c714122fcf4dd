"""Collect images from Unsplash and Pexels into datasets.

    GET  /v1/collect/sources                  -> sources, availability (and why not), licence summary
    POST /v1/collect/search                   {"query", "sources"?, "page"?, "per_page"?, "orientation"?, "color"?}
                                              (headers X-RateLimit-<Source>-Limit/-Remaining/-Reset)
    POST /v1/datasets/{id}/collect            {"result_ids", "tags"?} -> 202 job (kind datasets.collect)

The work is CollectService's (api/collect/service.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from api.collect.protocol import CollectImportRequest, CollectSearchRequest, CollectSearchResponse, SourceList
from api.collect.service import CollectService
from api.errors_protocol import ErrorResponse
from api.jobs.protocol import JobView
from api.jobs.router import accepted, jobs_service
from api.jobs.service import JobsService

router = APIRouter(tags=["collect"], responses={400: {"model": ErrorResponse}})


def collect_service(request: Request) -> CollectService:
    return request.app.state.collect


@router.get("/v1/collect/sources", response_model=SourceList)
async def list_sources(collect: CollectService = Depends(collect_service)) -> SourceList:
    return collect.list_sources()


@router.post("/v1/collect/search", response_model=CollectSearchResponse,
             responses={429: {"model": ErrorResponse}, 502: {"model": ErrorResponse}})
async def search(body: CollectSearchRequest, response: Response,
                 collect: CollectService = Depends(collect_service)) -> CollectSearchResponse:
    found = await collect.search(body)
    response.headers.update(collect.rate_limit_headers([*found.sources, *(e.source for e in found.errors)]))
    return found


@router.post("/v1/datasets/{dataset_id}/collect", status_code=202, response_model=JobView,
             responses={202: {"model": JobView, "description": "Accepted as a job; poll /v1/jobs/{id}."},
                        404: {"model": ErrorResponse}})
async def collect_into_dataset(dataset_id: str, body: CollectImportRequest, request: Request,
                               collect: CollectService = Depends(collect_service),
                               jobs: JobsService = Depends(jobs_service)):
    return accepted(jobs, await collect.submit(dataset_id, body), request)
