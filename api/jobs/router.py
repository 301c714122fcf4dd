"""The job API: GET /v1/jobs, GET /v1/jobs/{id}, POST /v1/jobs/{id}/cancel, GET /v1/jobs/{id}/events,
POST /v1/jobs/{id}/replay (run a finished job again from its recorded request, seeds pinned).

Cancel and replay need the scope of the job's kind (a dataset import: `train`; the others:
`generate`), and a replay is checked against today's policy (api/jobs/service.py)."""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import granted_scopes
from api.jobs.protocol import JobList, JobView
from api.jobs.service import JobsService
from storage.jobs import JobRecord

router = APIRouter(tags=["jobs"])


def jobs_service(request: Request) -> JobsService:
    return request.app.state.jobs


def base_url(request: Request) -> str:
    return str(request.base_url)


def wants_async(request: Request, async_flag: bool) -> bool:
    """`?async=true` or `Prefer: respond-async`: answer 202 with a job instead of waiting."""
    return async_flag or "respond-async" in request.headers.get("prefer", "")


def accepted(jobs: JobsService, record: JobRecord, request: Request) -> JSONResponse:
    """202 with the job's view and its Location."""
    view = jobs.view(record, base_url(request))
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/jobs/{record.id}"})


@router.get("/v1/jobs", response_model=JobList)
def list_jobs(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None,
              status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] | None = None,
              kind: str | None = None, jobs: JobsService = Depends(jobs_service)) -> JobList:
    return jobs.list(base_url(request), limit, after, status, kind)


@router.get("/v1/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, request: Request, jobs: JobsService = Depends(jobs_service)) -> JobView:
    return jobs.view(jobs.get(job_id), base_url(request))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
def cancel_job(job_id: str, request: Request, jobs: JobsService = Depends(jobs_service)) -> JobView:
    return jobs.view(jobs.cancel(job_id, granted_scopes(request)), base_url(request))


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request, jobs: JobsService = Depends(jobs_service)) -> StreamingResponse:
    """Server-sent events: one `job` event per change, ending with the terminal state."""
    await asyncio.to_thread(jobs.get, job_id)  # 404 before the stream starts
    close = jobs.open_stream()  # 429 past the key's open streams
    return StreamingResponse(jobs.events(job_id, base_url(request), request.is_disconnected, close),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/jobs/{job_id}/replay", status_code=202)
async def replay_job(job_id: str, request: Request, jobs: JobsService = Depends(jobs_service)) -> JSONResponse:
    return accepted(jobs, await asyncio.to_thread(jobs.replay, job_id, granted_scopes(request)), request)
