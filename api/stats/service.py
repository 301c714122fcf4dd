"""Platform statistics from the job records (the most recent `window`, the caller's own unless
admin) and from Serve (replica counts)."""

from __future__ import annotations

import asyncio
import collections
import math
from typing import Any, Callable

from api.auth import caller
from api.stats.protocol import Failure, Stats, Timing
from storage.jobs import JobRecord, JobStore

RECENT_FAILURES = 10


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def model_of(record: JobRecord) -> str:
    """The model a job ran on, as it recorded it (its result's `model`), else its kind."""
    result = record.result or {}
    return str(result.get("model") or record.kind)


def summarize(records: list[JobRecord], queue_depth: int, replicas: dict | None) -> Stats:
    jobs: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    errors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    durations: dict[str, list[float]] = collections.defaultdict(list)
    failures = []
    for record in records:
        jobs[record.kind][record.status] += 1
        if record.status == "completed" and record.started_at and record.finished_at:
            durations[model_of(record)].append(max(0.0, record.finished_at - record.started_at))
        if record.status == "failed":
            error_type = record.error.type if record.error else "unknown"
            errors[record.kind][error_type] += 1
            failures.append(Failure(id=record.id, kind=record.kind, type=error_type,
                                    message=(record.error.message if record.error else "")[:500],
                                    finished_at=record.finished_at))
    failures.sort(key=lambda f: f.finished_at or 0, reverse=True)
    timing = {model: Timing(count=len(values), mean_s=round(sum(values) / len(values), 4),
                            p95_s=round(percentile(values, 95), 4)) for model, values in durations.items()}
    return Stats(window=len(records), jobs={k: dict(v) for k, v in jobs.items()}, generation_s=timing,
                 errors={k: dict(v) for k, v in errors.items()}, recent_failures=failures[:RECENT_FAILURES],
                 queue_depth=queue_depth, replicas=replicas)


def serve_replicas() -> dict[str, dict[str, int]] | None:
    """Replicas by deployment and state, from the Serve controller (None outside a Serve app)."""
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():  # not inside a Ray app: asking would start or look for a cluster
            return None
        status = serve.status()
    except Exception:
        return None
    out: dict[str, dict[str, int]] = {}
    for app_name, app in status.applications.items():
        for name, deployment in app.deployments.items():
            out[f"{app_name}/{name}"] = {str(getattr(state, "value", state)): count
                                         for state, count in (deployment.replica_states or {}).items()}
    return out


class StatsService:
    def __init__(self, jobs: JobStore, replicas: Callable[[], dict | None] = serve_replicas):
        self.jobs = jobs
        self.replicas = replicas

    async def stats(self, window: int) -> Stats:
        who = caller()

        def collect() -> tuple[list[JobRecord], int]:
            visible = None if who.admin else (lambda r: who.sees(r.owner))
            return self.jobs.list(limit=window, visible=visible), self.jobs.count_active()

        records, depth = await asyncio.to_thread(collect)
        replicas: Any = await asyncio.to_thread(self.replicas)
        return summarize(records, depth, replicas)
