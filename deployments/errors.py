"""One error type for the whole API, mapped to `{"error": {"type", "message", "param"}}`.

Deployments raise these; Ray re-raises them through DeploymentHandles as instances of the same
class, so the ingress maps them to HTTP in one place (`ingress.error_response`).
"""

from __future__ import annotations

import json
from typing import Any


class AtelierError(Exception):
    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None, *, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def to_body(self) -> dict:
        return {"error": {"type": self.error_type, "message": self.message, "param": self.param}}

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.param, self.headers))


def _rebuild(cls, message, param, headers):
    return cls(message, param, headers=headers)


class InvalidRequestError(AtelierError):
    status_code = 400
    error_type = "invalid_request_error"


class UnauthorizedError(AtelierError):
    status_code = 401
    error_type = "authentication_error"


class NotFoundError(AtelierError):
    status_code = 404
    error_type = "not_found_error"


class ConflictError(AtelierError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLargeError(AtelierError):
    status_code = 413
    error_type = "payload_too_large"


class OverloadedError(AtelierError):
    """Refused for capacity; clients should retry after `retry_after` seconds."""

    status_code = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, param: str | None = None, *, retry_after: int = 1, headers: dict | None = None):
        super().__init__(message, param, headers={**(headers or {}), "Retry-After": str(retry_after)})


class JobCancelledError(AtelierError):
    status_code = 409
    error_type = "cancelled"


def parse_json(raw: str | bytes, param: str) -> Any:
    """json.loads for client input: malformed or too deeply nested JSON is a 400 naming `param`."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from None
    except RecursionError:  # e.g. "[" * 100_000: json.loads recurses once per level
        raise InvalidRequestError(f"{param} is nested too deeply", param) from None
