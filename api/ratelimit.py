"""Per-key rate limits and quotas, on the `limits` library (sliding-window counters).

Each API key has two budgets, both per window (`"120/minute"`, `"20000/hour"`: `limits`' notation):

- **requests**: every request the key makes counts 1 (the probes and the UI's static files
  need no key and count nothing);
- **cost**: what a request asks the models to do, in units, charged when the request is checked
  (before anything runs): SDXL `n × steps × ⌈megapixels⌉`, SVD `frames × steps`, the upscaler
  `images × steps`, the language model `n × max_tokens`, a workflow the sum of its model nodes.

Over either budget the answer is 429 with `Retry-After` (when the window frees enough room). A
single request that costs more than the whole budget is a 400 naming the field that makes it
cost. The counters live in `storage_uri`: `memory://` in one process (the local default, one
ingress replica), `redis://…` in production, so that every ingress replica spends from one budget.

Open mode (no keys, the trusted local machine) has no key to count against, so nothing is limited.
A cap on a key's unfinished jobs lives with the jobs (api/jobs/service.py).
"""

from __future__ import annotations

import logging
import math
import os
import time

from limits import RateLimitItem, parse
from limits.storage import storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from pydantic import BaseModel, Field, field_validator

from api.auth import caller
from deployments.errors import AtelierError, InvalidRequestError

logger = logging.getLogger("ray.serve")


class RateLimitedError(AtelierError):
    """Over a key's budget: retry after `retry_after` seconds."""

    status_code = 429
    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, param: str | None = None, *, retry_after: int = 1,
                 headers: dict | None = None):
        super().__init__(message, param, headers={**(headers or {}), "Retry-After": str(retry_after)})


class RateLimitConfig(BaseModel):
    enabled: bool = Field(True, description="Per-key budgets on (keys mode only: open mode has no keys).")
    storage_uri: str = Field("memory://", description="Where the counters live: memory:// (one process) or "
                                                      "redis://[:password@]host:port/db (shared by every ingress "
                                                      "replica). ${VARS} expand from the replica's environment.")
    requests: str = Field("600/minute", description="Requests per key per window (`limits` notation).")
    cost: str = Field("20000/hour", description="Cost units per key per window: SDXL n×steps×⌈MP⌉, SVD "
                                                "frames×steps, upscaler images×steps, LLM n×max_tokens.")
    max_active_jobs: int = Field(50, ge=1, description="Unfinished jobs one owner may have at once (a 429 past it).")

    @field_validator("requests", "cost")
    @classmethod
    def _window(cls, value: str) -> str:
        try:
            parse(value)
        except ValueError as exc:
            raise ValueError(f"not a rate like '100/minute': {exc}") from None
        return value


class RateLimiter:
    def __init__(self, config: RateLimitConfig):
        self.config = config
        self.enabled = config.enabled
        self.requests: RateLimitItem = parse(config.requests)
        self.cost: RateLimitItem = parse(config.cost)
        self.storage = storage_from_string(os.path.expandvars(config.storage_uri))
        self.limiter = SlidingWindowCounterRateLimiter(self.storage)

    def _hit(self, item: RateLimitItem, namespace: str, key: str, cost: int, what: str) -> None:
        if self.limiter.hit(item, namespace, key, cost=cost):
            return
        stats = self.limiter.get_window_stats(item, namespace, key)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimitedError(f"API key {key!r} is over its {what} budget ({item}); {stats.remaining} left in the "
                               f"window; retry after {retry_after} s", retry_after=retry_after)

    def request(self, key: str) -> None:
        """Count one request of `key` (AuthMiddleware calls this for every keyed request)."""
        if self.enabled:
            self._hit(self.requests, "requests", key, 1, "request")

    def charge(self, units: int, param: str) -> None:
        """Spend `units` of the calling key's cost budget; `param`: the field that makes the request cost."""
        key = caller().key
        if not self.enabled or key is None or units <= 0:
            return
        budget = self.cost.amount
        if units > budget:
            raise InvalidRequestError(f"this request costs {units} units, more than the key's whole budget of "
                                      f"{self.cost}; ask for less ({param})", param)
        self._hit(self.cost, "cost", key, int(units), "cost")


NO_RATE_LIMITS = RateLimiter(RateLimitConfig(enabled=False))  # a service's default until build_services sets one


# --- cost units ---------------------------------------------------------------------------------


def image_cost(n: int, steps: int | None, width: int, height: int, default_steps: int) -> int:
    """SDXL and image nodes: images × steps × ⌈megapixels⌉ (a 1024² image at 30 steps: 30)."""
    return max(1, n) * max(1, steps or default_steps) * max(1, math.ceil(width * height / (1024 * 1024)))


def video_cost(frames: int, steps: int | None, default_steps: int) -> int:
    return max(1, frames) * max(1, steps or default_steps)


def token_cost(n: int | None, max_tokens: int | None, default_max_tokens: int) -> int:
    return max(1, n or 1) * max(1, max_tokens or default_max_tokens)
