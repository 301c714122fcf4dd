"""Every error leaves here, in one JSON shape: {"error": {"type", "message", "param"}}.

AtelierError subclasses (raised by services, contracts and deployments) carry their status, type
and field; pydantic and FastAPI validation errors name the field; overload is a 503 with
Retry-After; anything else is a logged 500.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments import metrics
from deployments.errors import AtelierError, InvalidRequestError, PayloadTooLargeError

if TYPE_CHECKING:
    from vllm.exceptions import VLLMClientError

logger = logging.getLogger("ray.serve")


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _is_vllm_client_error(exc: Exception) -> bool:
    """vLLM is imported only by an app with a language model (api/text/router.py): without it,
    no vLLM error can arise."""
    exceptions = sys.modules.get("vllm.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.VLLMClientError)


def vllm_invalid_request(exc: VLLMClientError) -> InvalidRequestError:
    """vLLM's request models check some fields (prompt present, stream_options only with stream, ...)
    in validators that raise its own error, not a ValueError, so pydantic passes it through as it
    is: the client's mistake, a 400 naming the field vLLM names."""
    return InvalidRequestError(str(exc), getattr(exc, "parameter", None) or "body")


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or None


async def _atelier_error(request: Request, exc: Exception) -> JSONResponse:
    exc = getattr(exc, "cause", exc)  # a RayTaskError wraps what the replica raised
    if exc.status_code < 500 or exc.status_code == 503:
        metrics.rejected(exc.error_type)
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers or None)


async def _validation_error(request: Request, exc: RequestValidationError | ValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_of(tuple(first.get("loc", ())))
    details = "; ".join(f"{_param_of(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors)
    if first.get("type") == "json_invalid":
        param, details = "body", "request body is not valid JSON"
    metrics.rejected("invalid_request_error")
    return error_response(400, "invalid_request_error", details, param)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
    # FastAPI's own 400s are bodies it could not parse ("There was an error parsing the body": JSON
    # nested too deeply, a broken multipart form): the field at fault is the body.
    param = "body" if exc.status_code == 400 else None
    return error_response(exc.status_code, kind, str(exc.detail), param, getattr(exc, "headers", None))


async def _backpressure(request: Request, exc: BackPressureError) -> JSONResponse:
    # A handler of its own class: the catch-all below runs in Starlette's outermost middleware,
    # which re-raises. Pinned on the app (IngressApp), or Serve replaces it with a plain-text one.
    metrics.rejected("overloaded_error")
    retry_after = max(1, round(exc.retry_after_s or 1))
    return error_response(503, "overloaded_error", "the model is at capacity; retry shortly", None,
                          {"Retry-After": str(retry_after)})


async def _unavailable(request: Request, exc: DeploymentUnavailableError) -> JSONResponse:
    metrics.rejected("overloaded_error")
    return error_response(503, "overloaded_error", "the model is not available right now (starting or being "
                          "replaced); retry shortly", None, {"Retry-After": "5"})


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, AtelierError):
        return await _atelier_error(request, cause)
    if _is_vllm_client_error(cause):  # raised by vLLM's request models' validators
        return await _atelier_error(request, vllm_invalid_request(cause))
    if isinstance(cause, BackPressureError):
        return await _backpressure(request, cause)
    if isinstance(cause, (DeploymentUnavailableError, RayActorError)):  # RayActorError: the replica died mid-call
        return await _unavailable(request, cause)                           # (its node lost); Serve replaces it
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "server_error", "internal error; it has been logged", None)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AtelierError, _atelier_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(BackPressureError, _backpressure)
    app.add_exception_handler(DeploymentUnavailableError, _unavailable)
    app.add_exception_handler(Exception, _unexpected_error)


MULTIPART_OVERHEAD_BYTES = 64 * 1024


class BodySizeLimitMiddleware:
    """Refuses oversized bodies from Content-Length before reading them, and while streaming."""

    def __init__(self, app, limit_of):
        self.app = app
        self.limit_of = limit_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        limit = allowed = self.limit_of(scope)
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            # max_upload_bytes is per file (Uploads.read checks it exactly); boundaries, part headers
            # and the small form fields come on top, so a file of exactly the limit still fits.
            allowed += MULTIPART_OVERHEAD_BYTES
        path = scope.get("path", "")
        param = ("image" if path.endswith(("/images/edits", "/images/upscale"))
                 else "input_reference" if path.endswith("/v1/videos")
                 else "files" if path.endswith("/images") else "file" if path == "/v1/models" else "body")
        declared = headers.get(b"content-length")
        if declared and declared.isdigit() and int(declared) > allowed:
            return await self._refuse(scope, receive, send, int(declared), limit, param)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > allowed:
                raise PayloadTooLargeError(f"request body is over the limit of {limit} bytes", param)
            return message

        await self.app(scope, counting_receive, send)

    async def _refuse(self, scope, receive, send, size, limit, param):
        metrics.rejected(PayloadTooLargeError.error_type)
        await _linger(receive)
        response = error_response(413, PayloadTooLargeError.error_type,
                                  f"{param} upload is {size} bytes, over the limit of {limit} bytes", param,
                                  {"Connection": "close"})
        await response(scope, receive, send)


LINGER_BYTES = 64 * 1024 * 1024
LINGER_S = 5.0


async def _linger(receive) -> None:
    """Read and drop what the client is still sending (up to LINGER_BYTES or LINGER_S), as nginx's
    lingering close does, so that it reads the 413 instead of a reset: answered early behind HAProxy,
    a client still uploading 50 MB had its connection closed under it (httpx: a write error, no
    status)."""
    loop = asyncio.get_running_loop()
    end, drained = loop.time() + LINGER_S, 0
    while drained < LINGER_BYTES and (left := end - loop.time()) > 0:
        try:
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            return
        if message.get("type") != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body"):
            return
