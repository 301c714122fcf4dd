"""Atelier's custom metrics, exported through Ray's Prometheus endpoint (`ray_atelier_*`).

Created on first use in each process (Ray metrics need a connected worker); outside Ray (unit
tests, scripts) every call is a no-op, so instrumented code never depends on a cluster.
"""

from __future__ import annotations

import logging
from functools import lru_cache

logger = logging.getLogger("ray.serve")

LATENCY_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
DURATION_BOUNDARIES = [0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600]


class _NoOp:
    def inc(self, *args, **kwargs) -> None: ...
    def observe(self, *args, **kwargs) -> None: ...
    def set(self, *args, **kwargs) -> None: ...


@lru_cache(maxsize=None)
def _metric(kind: str, name: str, description: str, tags: tuple[str, ...]):
    import ray
    from ray.util import metrics

    if not ray.is_initialized():
        return _NoOp()
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=tags)
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=tags)
    boundaries = DURATION_BOUNDARIES if name == "atelier_job_duration_s" else LATENCY_BOUNDARIES
    return metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tags)


def _safe(record):
    def wrapper(*args, **kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:  # metrics never fail a request
            logger.debug("metric not recorded", exc_info=True)

    return wrapper


@_safe
def queue_depth(depth: int) -> None:
    """Unfinished jobs in the store. Job runner replicas report it after every job and on a timer
    (JobRunnerDeployment.report_queue_depth); every series carries the same store-wide count, so
    read it with max(), not sum()."""
    _metric("gauge", "atelier_job_queue_depth", "Unfinished jobs (queued or running), store-wide.",
            ()).set(depth)


@_safe
def job_finished(kind: str, outcome: str, duration_s: float) -> None:
    _metric("histogram", "atelier_job_duration_s", "Job duration from start to end, by kind and outcome.",
            ("kind", "outcome")).observe(duration_s, tags={"kind": kind, "outcome": outcome})


@_safe
def generation(model: str, mode: str, latency_s: float, steps: int, images: int) -> None:
    """One pipeline call: its latency, and denoising steps/s (steps x images per second)."""
    _metric("histogram", "atelier_generation_latency_s", "Model pipeline call latency.",
            ("model", "mode")).observe(latency_s, tags={"model": model, "mode": mode})
    if latency_s > 0:
        _metric("gauge", "atelier_denoising_steps_per_s", "Denoising steps per second in the last call "
                "(steps x images).", ("model",)).set(steps * images / latency_s, tags={"model": model})


@_safe
def rejected(reason: str) -> None:
    _metric("counter", "atelier_rejected_requests_total", "Requests refused, by reason (error type).",
            ("reason",)).inc(tags={"reason": reason})


@_safe
def lora_cache(hit: bool) -> None:
    _metric("counter", "atelier_lora_cache_total", "LoRA adapter lookups on SDXL replicas.",
            ("result",)).inc(tags={"result": "hit" if hit else "miss"})
