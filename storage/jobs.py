"""Job records: one JSON object per job under ``jobs/`` in the storage root.

Ownership: while a job runs, the worker owns ``jobs/<id>.json`` (it writes status, progress,
outputs). The ingress never rewrites a running job's record; to cancel it writes the separate
marker ``jobs/<id>.cancel``, so a concurrent worker write cannot erase the request. Workers
poll :meth:`JobStore.is_cancel_requested` (one ``exists``) before starting and between steps.

Records are written atomically (see :mod:`storage.fs`), but ``update`` is a plain
read-modify-write: concurrent writers of one record are last-writer-wins.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage
from storage.keys import (
    JOBS_ACTIVE_PREFIX,
    JOBS_PREFIX,
    id_time,
    job_active_key,
    job_cancel_key,
    job_key,
    new_id,
    owner_active_prefix,
    validate_id,
)

__all__ = [
    "JobStatus",
    "TERMINAL_STATUSES",
    "JOB_STATUSES",
    "JobError",
    "JobOutput",
    "JobRecord",
    "JobNotFoundError",
    "JobStore",
]

log = logging.getLogger(__name__)

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
JOB_STATUSES = frozenset({"queued", "in_progress", "completed", "failed", "cancelled"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})

_JSON_SUFFIX = ".json"
_REFERENCE_SKEW_S = 3600.0


def _names(value: Any, key: str) -> bool:
    """Whether ``key`` is a string somewhere in ``value`` (a request: dicts, lists, strings)."""
    if isinstance(value, str):
        return value == key
    if isinstance(value, dict):
        return any(_names(v, key) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names(v, key) for v in value)
    return False


class JobError(BaseModel):
    type: str
    message: str
    # What the failure's error body named, so an answer built from the record has the same shape as
    # one raised in the ingress: the field at fault, OpenAI's `code` (content_policy_violation) and
    # the policy category of a refusal.
    param: str | None = None
    code: str | None = None
    category: str | None = None


class JobOutput(BaseModel):
    key: str
    content_type: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    extra: dict = Field(default_factory=dict)


class JobRecord(BaseModel):
    # unknown fields (e.g. written by a newer version) are ignored on read
    model_config = ConfigDict(extra="ignore")

    id: str
    kind: str
    status: JobStatus = "queued"
    progress: float = 0.0  # 0..100 overall
    stage: str | None = None  # current stage name
    stages: list[str] = Field(default_factory=list)  # all stage names, in order
    stage_progress: float = 0.0  # 0..100 within the current stage
    step: int | None = None
    total_steps: int | None = None
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    attempts: int = 0
    max_attempts: int = 2
    task_id: str | None = None  # the queue engine's task id
    request: dict = Field(default_factory=dict)  # the validated request that created it
    outputs: list[JobOutput] = Field(default_factory=list)
    result: dict | None = None  # free-form metadata (seeds, timings...)
    error: JobError | None = None
    cancel_requested: bool = False
    # The tenant of the API key that submitted it (None: open mode, or written before owners):
    # only that tenant and admin keys see it (api/auth.py Caller).
    owner: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class JobNotFoundError(KeyError):
    """No job with this id (unknown, or not a valid id at all)."""

    def __init__(self, job_id: object):
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job {self.job_id!r} not found"


def _valid_job_id(job_id: object) -> str:
    try:
        return validate_id(job_id, "job id")
    except ValueError:
        raise JobNotFoundError(job_id) from None


class JobStore:
    """Create, read, update and list job records in a :class:`Storage`."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __reduce__(self):
        return (type(self), (self.storage,))

    # -- records --------------------------------------------------------------------------

    def create(
        self,
        kind: str,
        request: dict,
        stages: list[str] | None = None,
        max_attempts: int = 2,
        task_id: str | None = None,
        owner: str | None = None,
    ) -> JobRecord:
        """A new ``queued`` record, persisted before it is returned (with the id of the queue task
        that will run it, when known: one write at submit)."""
        if not isinstance(kind, str) or not kind:
            raise ValueError("job kind must be a non-empty string")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        now = time.time()
        record = JobRecord(
            id=new_id("job"),
            kind=kind,
            request=dict(request or {}),
            stages=list(stages or []),
            max_attempts=max_attempts,
            created_at=now,
            updated_at=now,
            task_id=task_id,
            owner=owner,
        )
        self._write(record)
        self.storage.put_bytes(job_active_key(record.id), b"")
        if owner:
            self.storage.put_bytes(owner_active_prefix(owner) + record.id, b"")
        return record

    def get(self, job_id: str) -> JobRecord:
        """The stored record; :class:`JobNotFoundError` if unknown or not a valid id."""
        key = job_key(_valid_job_id(job_id))
        try:
            data = self.storage.get_json(key)
        except (ObjectNotFoundError, InvalidKeyError):
            raise JobNotFoundError(job_id) from None
        return JobRecord.model_validate(data)

    def save(self, record: JobRecord) -> JobRecord:
        """Write ``record`` (atomically), stamping ``updated_at``; returns it."""
        validate_id(record.id, "job id")
        record.updated_at = time.time()
        self._write(record)
        return record

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Read, change ``fields``, validate and write back. Unknown fields raise TypeError."""
        unknown = set(fields) - set(JobRecord.model_fields)
        if unknown:
            raise TypeError(f"unknown job record field(s): {', '.join(sorted(unknown))}")
        if "id" in fields and fields["id"] != job_id:
            raise ValueError("a job's id cannot be changed")
        record = self.get(job_id)
        merged = {**record.model_dump(), **fields}
        try:
            new = JobRecord.model_validate(merged)
        except ValidationError as e:
            raise ValueError(f"invalid job record update: {e}") from e
        return self.save(new)

    def delete(self, job_id: str) -> None:
        """Remove the record and its cancel marker (missing is fine)."""
        job_id = _valid_job_id(job_id)
        try:
            owner = self.get(job_id).owner
        except (JobNotFoundError, ValueError, ValidationError):
            owner = None
        if owner:
            self.storage.delete(owner_active_prefix(owner) + job_id)
        self.storage.delete(job_active_key(job_id))
        self.storage.delete(job_cancel_key(job_id))
        self.storage.delete(job_key(job_id))

    def _write(self, record: JobRecord) -> None:
        self.storage.put_json(job_key(record.id), record.model_dump(mode="json"))
        if record.is_terminal:
            self.storage.delete(job_active_key(record.id))
            if record.owner:
                self.storage.delete(owner_active_prefix(record.owner) + record.id)

    # -- unfinished jobs ------------------------------------------------------------------

    def active_ids(self) -> list[str]:
        """Ids of unfinished jobs, oldest first, from the ``jobs/active/`` index (no record reads)."""
        return sorted(key[len(JOBS_ACTIVE_PREFIX):] for key in self.storage.list(JOBS_ACTIVE_PREFIX))

    def count_active(self) -> int:
        return len(self.active_ids())

    def count_active_of(self, owner: str, at_least: int) -> int:
        """How many unfinished jobs ``owner`` has, from its markers (one list). Only when there are
        ``at_least`` of them are they checked against the records (a marker whose job finished or
        was deleted without it is dropped), so a cap is never hit on stale markers."""
        prefix = owner_active_prefix(owner)
        keys = self.storage.list(prefix)
        if len(keys) < at_least:
            return len(keys)
        count = 0
        for key in keys:
            job_id = key[len(prefix):]
            try:
                record = self.get(job_id)
            except (JobNotFoundError, ValueError, ValidationError):
                record = None
            if record is None or record.is_terminal:
                self.storage.delete(key)
            else:
                count += 1
        return count

    def list_active(self) -> list[JobRecord]:
        """Unfinished job records, oldest first; index entries of finished or deleted jobs are dropped."""
        records = []
        for job_id in self.active_ids():
            try:
                record = self.get(job_id)
            except JobNotFoundError:
                self.storage.delete(job_active_key(job_id))
                continue
            if record.is_terminal:
                self.storage.delete(job_active_key(job_id))
                continue
            records.append(record)
        return records

    # -- listing --------------------------------------------------------------------------

    def list_ids(self, after: str | None = None) -> list[str]:
        """All job ids, newest first (ids are time-sortable); only those older than ``after``."""
        ids = []
        for key in self.storage.list(JOBS_PREFIX, recursive=False):
            name = key[len(JOBS_PREFIX) :]
            if not name.endswith(_JSON_SUFFIX):
                continue
            job_id = name[: -len(_JSON_SUFFIX)]
            try:
                validate_id(job_id)
            except ValueError:
                continue
            if after is not None and job_id >= after:
                continue
            ids.append(job_id)
        ids.sort(reverse=True)
        return ids

    def list(
        self,
        limit: int = 20,
        after: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        visible: Callable[[JobRecord], bool] | None = None,
    ) -> list[JobRecord]:
        """Newest first, at most ``limit``. ``after`` is an id cursor: only older jobs; ``visible``:
        only the records it accepts (e.g. one owner's).

        Without filters only the returned records are read; with ``status``/``kind``/``visible``
        records are read newest first until ``limit`` match.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a non-negative integer")
        if after is not None and not isinstance(after, str):
            raise ValueError("after must be a job id")
        if status is not None and status not in JOB_STATUSES:
            raise ValueError(
                f"status must be one of {', '.join(sorted(JOB_STATUSES))}, got {status!r}"
            )
        out: list[JobRecord] = []
        if limit == 0:
            return out
        for job_id in self.list_ids(after=after):
            try:
                record = self.get(job_id)
            except JobNotFoundError:
                continue  # deleted since listing
            except (ValueError, ValidationError) as e:
                log.warning("skipping unreadable job record %s: %s", job_id, e)
                continue
            if status is not None and record.status != status:
                continue
            if kind is not None and record.kind != kind:
                continue
            if visible is not None and not visible(record):
                continue
            out.append(record)
            if len(out) >= limit:
                break
        return out

    # -- shared inputs --------------------------------------------------------------------

    def referencing(self, key: str, exclude: Iterable[str] = ()) -> list[str]:
        """Ids of the jobs, but ``exclude``, whose request names ``key`` (a string value equal to
        it, at any depth), newest first.

        A replay reuses its original's inputs (an uploaded image), so a job being deleted must
        delete a shared input only when no other job names it::

            if not jobs.referencing(source, exclude=[record.id]):
                storage.delete(source)

        Reads job records newest first. When ``key`` holds an id made by :func:`new_id` (an
        upload's), jobs made more than an hour (clock skew between replicas) before that id are
        not read: they cannot name an input made after them.
        """
        excluded = set(exclude)
        made = [t for t in (id_time(seg) for seg in key.split("/")) if t is not None]
        cutoff = min(made) - _REFERENCE_SKEW_S if made else None
        found = []
        for job_id in self.list_ids():
            made_at = id_time(job_id)
            if cutoff is not None and made_at is not None and made_at < cutoff:
                break  # newest first: every later id is older still
            if job_id in excluded:
                continue
            try:
                record = self.get(job_id)
            except JobNotFoundError:
                continue
            except (ValueError, ValidationError) as e:
                log.warning("skipping unreadable job record %s: %s", job_id, e)
                continue
            if _names(record.request, key):
                found.append(job_id)
        return found

    # -- cancellation ---------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> JobRecord:
        """Ask for a job to stop.

        Terminal jobs are returned unchanged (no marker). Otherwise the cancel marker is
        written; a still-``queued`` job is also marked ``cancelled`` at once (a worker that
        picks it up concurrently still sees the marker). The returned record has
        ``cancel_requested=True``.
        """
        record = self.get(job_id)
        if record.is_terminal:
            return record
        self.storage.put_json(job_cancel_key(record.id), {"requested_at": time.time()})
        if record.status == "queued":
            now = time.time()
            record.status = "cancelled"
            record.finished_at = now
            record.cancel_requested = True
            record.stage = None
            self.save(record)
            return record
        record.cancel_requested = True
        return record

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether the cancel marker exists (one ``exists`` call)."""
        try:
            return self.storage.exists(job_cancel_key(_valid_job_id(job_id)))
        except JobNotFoundError:
            return False

    def get_with_cancel(self, job_id: str) -> JobRecord:
        """The record, with ``cancel_requested`` also reflecting the marker."""
        record = self.get(job_id)
        if not record.cancel_requested and self.is_cancel_requested(record.id):
            record.cancel_requested = True
        return record
