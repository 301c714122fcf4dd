"""Fine-tuning jobs (OpenAI's fine-tuning shapes): LoRA / DreamBooth runs on Ray Train.

    POST /v1/fine_tuning/jobs               checked now (400 naming the field), then submitted as a Ray job
    GET  /v1/fine_tuning/jobs               newest first (`after`, `limit`)
    GET  /v1/fine_tuning/jobs/{id}          status, progress (step/total, loss), the registered LoRA
    GET  /v1/fine_tuning/jobs/{id}/events   the run's log lines as events (steps with loss, resume, errors)
    POST /v1/fine_tuning/jobs/{id}/cancel   stops the Ray job; a stopped run registers nothing
    GET  /v1/fine_tuning/jobs/{id}/files?name=  one of the job's result_files: a validation image (PNG)

The work is FineTuningService's (api/fine_tuning/service.py); this module parses and answers.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from api.fine_tuning.protocol import FineTuningCreate, FineTuningEventList, FineTuningJob, FineTuningJobList
from api.fine_tuning.service import FineTuningService

__all__ = ["router", "fine_tuning_service"]

router = APIRouter(tags=["fine-tuning"])


def fine_tuning_service(request: Request) -> FineTuningService:
    return request.app.state.fine_tuning


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, status_code=200)
async def create_fine_tuning_job(body: FineTuningCreate,
                                 fine_tuning: FineTuningService = Depends(fine_tuning_service)) -> FineTuningJob:
    return await fine_tuning.create(body)


@router.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList)
async def list_fine_tuning_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                                fine_tuning: FineTuningService = Depends(fine_tuning_service)) -> FineTuningJobList:
    return await fine_tuning.list(after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
async def get_fine_tuning_job(job_id: str,
                              fine_tuning: FineTuningService = Depends(fine_tuning_service)) -> FineTuningJob:
    return await fine_tuning.get(job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=FineTuningEventList)
async def list_fine_tuning_events(job_id: str, limit: int = Query(100, ge=1, le=1000),
                                  fine_tuning: FineTuningService = Depends(fine_tuning_service)
                                  ) -> FineTuningEventList:
    """The run's log lines (those it prints as `[run] …`, and errors), newest first."""
    return await fine_tuning.events(job_id, limit)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
async def cancel_fine_tuning_job(job_id: str,
                                 fine_tuning: FineTuningService = Depends(fine_tuning_service)) -> FineTuningJob:
    return await fine_tuning.cancel(job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/files", responses={200: {"content": {"image/png": {}}}})
async def get_fine_tuning_file(job_id: str,
                               name: str | None = Query(None, description="A name from the job's result_files."),
                               fine_tuning: FineTuningService = Depends(fine_tuning_service)) -> StreamingResponse:
    """One of the job's result_files (its validation images). The name is a query parameter (the job's
    own id is the path's one); the job is looked up first, so another owner's job is a 404 either way."""
    handle, size = await asyncio.to_thread(fine_tuning.open_file, job_id, name)

    def chunks():
        with handle:
            while chunk := handle.read(1 << 20):
                yield chunk

    filename = f"{job_id}-{name.replace('/', '-')}"
    return StreamingResponse(chunks(), media_type="image/png", headers={
        "Content-Length": str(size), "Content-Disposition": f'inline; filename="{filename}"'})
