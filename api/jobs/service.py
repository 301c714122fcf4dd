"""Durable jobs: record and enqueue one, read it back as the API's view, cancel it, follow it."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from api.auth import PermissionDeniedError, caller
from api.files.service import FilesService
from api.jobs.protocol import JobList, JobOutputView, JobView
from api.ratelimit import NO_RATE_LIMITS, RateLimitedError, RateLimiter
from deployments.errors import ConflictError, NotFoundError, OverloadedError
from graphs.job_runner import JobQueueConfig, new_task_id, send_job
from graphs.payloads import JobPayload, replay_payload, replay_seed_missing
from storage.assets import AssetIndex, AssetQuery
from storage.jobs import TERMINAL_STATUSES, JobNotFoundError, JobRecord, JobStore

logger = logging.getLogger("ray.serve")

# Job inputs that are internal plumbing, not the user's settings.
PRIVATE_PARAMS = frozenset({"config", "chat", "store", "output_id"})

# The scope a key needs to cancel or replay a job of each kind: the scope of the route that
# submits such a job (POST /v1/datasets/{id}/imports needs `train`); any other kind `generate`.
KIND_SCOPES: dict[str, str] = {"datasets.import": "train", "datasets.collect": "train",
                               "datasets.captions": "train"}

# A replay is checked against the policy in force now, as a new submit is: each area registers
# its check for its kinds (api/services.py): the payload in, the payload to submit out, or an
# AtelierError (a 400 naming the field, as the submit route would answer).
ReplayCheck = Callable[[JobPayload], JobPayload]


def kind_scope(kind: str) -> str:
    return KIND_SCOPES.get(kind, "generate")


def public_params(request: Any) -> Any:
    """A job's request as its user gave it (prompt, seed, model, LoRA...): its lineage."""
    if isinstance(request, dict):
        return {k: public_params(v) for k, v in request.items() if k not in PRIVATE_PARAMS}
    if isinstance(request, list):
        return [public_params(v) for v in request]
    return request


class JobsService:
    def __init__(self, jobs: JobStore, queue: Any, queue_config: JobQueueConfig, files: FilesService,
                 sse_poll_s: float = 0.25, *, rate: RateLimiter = NO_RATE_LIMITS, sse_max_lifetime_s: float = 600.0,
                 sse_max_per_key: int = 8):
        self.jobs = jobs
        self.queue = queue  # the task processor adapter the job runners consume from
        self.queue_config = queue_config
        self.files = files
        self.sse_poll_s = sse_poll_s
        self.rate = rate  # its config caps each owner's unfinished jobs
        self.sse_max_lifetime_s = sse_max_lifetime_s
        self.sse_max_per_key = sse_max_per_key
        self._streams: dict[str, list[float]] = {}  # open event streams per API key (when each ends), here
        self.replay_checks: dict[str, ReplayCheck] = {}  # by job kind; see ReplayCheck
        self.on_create: list[Callable[[str], None]] = []  # told each new job's id (the asset index)
        self.index: AssetIndex | None = None  # the asset index, when the ingress has one: the listing uses it

    def submit(self, payload: JobPayload, stages: list[str] | None = None) -> JobRecord:
        """Durably record a job (its kind and the payload as stored JSON) and enqueue it; 503 when the
        queue is full or unreachable."""
        depth = self.jobs.count_active()
        if depth >= self.queue_config.max_queue_depth:
            raise OverloadedError(f"the job queue is full ({depth} unfinished jobs); retry later", retry_after=5)
        who = caller()
        cap = self.rate.config.max_active_jobs
        if self.rate.enabled and who.owner is not None and not who.admin:
            active = self.jobs.count_active_of(who.owner, at_least=cap)
            if active >= cap:
                raise RateLimitedError(f"{active} of your jobs are unfinished, the most one owner may have here; "
                                       "retry when one has finished", retry_after=5)
        # The queue depth gauge is reported by the job runners (JobRunnerDeployment.report_queue_depth),
        # which also see jobs finish; a value set here would never be lowered.
        record = self.jobs.create(payload.kind, payload.to_request(), stages=stages or [],
                                  max_attempts=self.queue_config.max_attempts, task_id=new_task_id(),
                                  owner=caller().owner)
        for hook in self.on_create:
            hook(record.id)
        try:
            send_job(self.queue, record)
        except Exception as exc:
            logger.exception("enqueue of job %s failed", record.id)
            self.jobs.update(record.id, status="failed", finished_at=time.time(),
                             error={"type": "queue_unavailable", "message": f"could not enqueue: {exc}"})
            raise OverloadedError("the job queue is unavailable; retry later", retry_after=5) from exc
        return record

    async def submit_async(self, payload: JobPayload, stages: list[str] | None = None) -> JobRecord:
        return await asyncio.to_thread(self.submit, payload, stages)

    def replay(self, job_id: str, scopes: frozenset[str] | set[str]) -> JobRecord:
        """Run a finished job again from its recorded request, every seed it used pinned. The key
        needs the scope of the job's kind, and the request is checked against today's policy
        (limits, import roots and allow-lists), not the one in force when it was first submitted."""
        record = self.get(job_id)
        self.check_scope(record, scopes, "replay")
        if not record.is_terminal:
            raise ConflictError(f"job {job_id} is {record.status}; replay it once it has finished", "job_id")
        if replay_seed_missing(record):
            raise ConflictError(f"job {job_id} never recorded its seed, so a replay could not reproduce it", "job_id")
        payload = replay_payload(record)
        check = self.replay_checks.get(record.kind)
        if check is not None:
            payload = check(payload)
        return self.submit(payload, list(record.stages))

    @staticmethod
    def check_scope(record: JobRecord, scopes: frozenset[str] | set[str], action: str) -> None:
        """403 unless the key holds the scope of the job's kind (KIND_SCOPES)."""
        needed = kind_scope(record.kind)
        if needed not in scopes:
            raise PermissionDeniedError(f"to {action} a {record.kind} job an API key needs the {needed!r} scope",
                                        "job_id")

    def get(self, job_id: str) -> JobRecord:
        """The caller's job (any job for admin); another owner's is as unknown as a missing one."""
        try:
            record = self.jobs.get_with_cancel(job_id)
        except JobNotFoundError:
            record = None
        if record is None or not caller().sees(record.owner):
            raise NotFoundError(f"no job with id {job_id!r}", "job_id")
        return record

    def view(self, record: JobRecord, base_url: str) -> JobView:
        data = record.model_dump(mode="json")
        data["params"] = public_params(record.request)
        data["outputs"] = [
            JobOutputView(url=self.files.url_for(o.key, base_url), **o.model_dump(include={
                "key", "content_type", "width", "height", "seed", "extra"}))
            for o in record.outputs
        ]
        return JobView.model_validate(data)

    def list(self, base_url: str, limit: int, after: str | None, status: str | None, kind: str | None) -> JobList:
        """Newest first, the caller's own (admin: all). From the asset index once it is built (a
        job made *and* finished on another replica shows up within its ``sync_interval_s``);
        otherwise, or if the local index fails, from the records (``JobStore.list``)."""
        who = caller()
        records = None
        if self.index is not None:
            try:
                if self.index.refresh(build=False):
                    rows = self.index.search(AssetQuery(status=status, kind=kind, owner=who.owner,
                                                        all_owners=who.admin, after=after, limit=limit + 1))
                    records = [JobRecord.model_validate(row["record"]) for row in rows]
            except sqlite3.Error:
                logger.exception("job listing from the asset index failed; listing the records")
        if records is None:
            records = self.jobs.list(limit=limit + 1, after=after, status=status, kind=kind,
                                     visible=None if who.admin else (lambda r: who.sees(r.owner)))
        views = [self.view(r, base_url) for r in records[:limit]]
        return JobList(data=views, has_more=len(records) > limit, last_id=views[-1].id if views else None)

    def cancel(self, job_id: str, scopes: frozenset[str] | set[str]) -> JobRecord:
        """Ask a job to stop; the key needs the scope of the job's kind."""
        self.check_scope(self.get(job_id), scopes, "cancel")
        return self.jobs.request_cancel(job_id)

    def open_stream(self) -> Callable[[], None]:
        """Count an event stream against the caller's key (429 past `sse_max_per_key` in this
        replica); returns the function that closes it. A stream that never closed (its response was
        never sent) stops counting once its lifetime is over."""
        key = caller().key
        if key is None:
            return lambda: None
        now = time.monotonic()
        open_ = [t for t in self._streams.get(key, []) if t > now]  # each stream's latest end
        if len(open_) >= self.sse_max_per_key:
            raise RateLimitedError(f"API key {key!r} has {self.sse_max_per_key} event streams open, the most it may "
                                   "have here; close one, or poll GET /v1/jobs/{id}", retry_after=5)
        ends = now + self.sse_max_lifetime_s + 5
        self._streams[key] = [*open_, ends]

        def close() -> None:
            left = self._streams.get(key, [])
            if ends in left:
                left.remove(ends)
            if not left:
                self._streams.pop(key, None)

        return close

    async def events(self, job_id: str, base_url: str,
                     disconnected: Callable[[], Awaitable[bool]], close: Callable[[], None] = lambda: None
                     ) -> AsyncIterator[str]:
        """Server-sent events: one `job` event per change, ending with the terminal state. A stream
        lives at most `sse_max_lifetime_s`; then it ends with a `retry` hint and EventSource clients
        reconnect (they get the current state at once)."""
        try:
            async for event in self._events(job_id, base_url, disconnected):
                yield event
        finally:
            close()

    async def _events(self, job_id: str, base_url: str,
                      disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        ends = time.monotonic() + self.sse_max_lifetime_s
        last = None
        while True:
            record = await asyncio.to_thread(self.get, job_id)
            view = self.view(record, base_url).model_dump(mode="json")
            if view != last:
                yield f"event: job\ndata: {json.dumps(view)}\n\n"
                last = view
            if record.status in TERMINAL_STATUSES:
                yield "event: done\ndata: [DONE]\n\n"
                return
            if await disconnected():
                return
            if time.monotonic() >= ends:
                yield "retry: 1000\nevent: reconnect\ndata: {}\n\n"
                return
            await asyncio.sleep(self.sse_poll_s)
