"""HTTP hardening around the API, decided per route, never per path prefix.

- `route_of(scope, routes)`: the route Starlette will dispatch a request to, found the way its
  router finds it (the app-relative path: Serve's `route_prefix`, the ASGI `root_path`, is
  taken off first). The auth check (api/auth.py) and the body check below read what a route
  declares, so a prefix in front of the app changes nothing.
- `MediaTypeMiddleware`: a request body must be of a media type its route takes (JSON routes take
  only `application/json`; form routes a form), checked before the body is read: a `text/plain`
  body, which a browser may send cross-site without a preflight, is a 415 naming `body`, never
  parsed as JSON.
- `SecurityHeadersMiddleware`: `Content-Security-Policy` (self only; the web UI has no inline
  script or style), `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`
  (and `frame-ancestors 'none'`), `Referrer-Policy: no-referrer` on every response.
- `HostAllowListMiddleware`: Starlette's `TrustedHostMiddleware` (a Host allow-list, against DNS
  rebinding), its refusal in the API's error shape. CORS (FastAPI's `CORSMiddleware`, off unless
  origins are configured) is wired in api/ingress.py.
"""

from __future__ import annotations

from typing import Any, Iterable

from fastapi.params import Form
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.routing import Match

from deployments import metrics
from deployments.errors import AtelierError

# The loopback names a local browser uses; never a name DNS can point elsewhere (DNS rebinding).
DEFAULT_ALLOWED_HOSTS = ["localhost", "127.0.0.1", "[::1]"]

# The web UI loads its own modules and stylesheet only (no inline script or style). Images and
# videos may also be blob: URLs (fetched with the key) or presigned S3 URLs (https:).
DEFAULT_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob: https:; "
               "media-src 'self' blob: https:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
               "form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from jsDelivr with an inline script.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; img-src 'self' data: https:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

JSON = "application/json"
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
_NO_ROUTE = object()


class UnsupportedMediaTypeError(AtelierError):
    status_code = 415
    error_type = "unsupported_media_type"


def require_media_type(content_type: str | None, accepted: tuple[str, ...]) -> None:
    """415 naming `body` unless `content_type` is one of `accepted`."""
    given = media_type(content_type or "")
    if not is_accepted(given, accepted):
        what = f"Content-Type {given!r}" if given else "no Content-Type"
        raise UnsupportedMediaTypeError(f"the request body must be sent as {' or '.join(accepted)}; got {what}",
                                        "body")


def route_of(scope: dict, routes: Iterable[Any]) -> Any | None:
    """The route this request goes to (a full match: path and method), as the router picks it;
    None for a 404 or a 405. Cached in the scope, for the next middleware."""
    found = scope.get("atelier.route", _NO_ROUTE)
    if found is _NO_ROUTE:
        found = None
        for route in routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                found = route
                break
        scope["atelier.route"] = found
    return found


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def accepted_media_types(route: Any) -> tuple[str, ...] | None:
    """The media types a route's body may have: what its OpenAPI documents for a route that reads
    its body itself (`openapi_extra`), else what FastAPI parses for it (JSON, or a form). None:
    the route takes no body."""
    if not isinstance(route, APIRoute):
        return None
    documented = ((route.openapi_extra or {}).get("requestBody") or {}).get("content")
    if documented:
        return tuple(media_type(t) for t in documented)
    if route.body_field is None:
        return None
    return FORMS if isinstance(route.body_field.field_info, Form) else (JSON,)


def is_accepted(given: str, accepted: tuple[str, ...]) -> bool:
    if given in accepted:
        return True
    # JSON's structured-syntax suffix (application/merge-patch+json, ...) is JSON to the parser too.
    return JSON in accepted and given.startswith("application/") and given.endswith("+json")


def has_body(headers: dict[bytes, bytes]) -> bool:
    length = headers.get(b"content-length", b"").strip()
    if length:
        return not length.isdigit() or int(length) > 0
    return b"transfer-encoding" in headers


class MediaTypeMiddleware:
    """415 (naming `body`) for a body of a media type its route does not take, before it is read."""

    def __init__(self, app, routes_of):
        self.app = app
        self.routes_of = routes_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        route = route_of(scope, self.routes_of())
        accepted = accepted_media_types(route)
        if accepted is not None and has_body(headers):
            try:
                require_media_type(headers.get(b"content-type", b"").decode("latin-1"), accepted)
            except UnsupportedMediaTypeError as exc:
                metrics.rejected(exc.error_type)
                return await JSONResponse(exc.to_body(), status_code=exc.status_code)(scope, receive, send)
        await self.app(scope, receive, send)


class SecurityHeadersMiddleware:
    """Hardening headers on every response (a header the response sets itself is kept)."""

    def __init__(self, app, routes_of, csp: str = DEFAULT_CSP, docs_paths: Iterable[str] = ()):
        self.app = app
        self.routes_of = routes_of
        self.csp = csp
        self.docs_paths = frozenset(p for p in docs_paths if p)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = self.csp
        if self.docs_paths:
            route = route_of(scope, self.routes_of())
            if getattr(route, "path", None) in self.docs_paths:
                csp = DOCS_CSP
        extra = [(b"content-security-policy", csp.encode()), (b"x-content-type-options", b"nosniff"),
                 (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer")]

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class HostAllowListMiddleware:
    """Starlette's TrustedHostMiddleware (the Host header against `allowed_hosts`, the port
    ignored), answering its refusal in the API's error shape: a 400 naming `host`."""

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed_hosts = list(allowed_hosts)
        self.guard = TrustedHostMiddleware(self._allowed, allowed_hosts=self.allowed_hosts, www_redirect=False)

    async def _allowed(self, scope, receive, send):
        scope["atelier.host_allowed"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_refusal(message):
            if scope.get("atelier.host_allowed"):
                return await send(message)
            if message["type"] == "http.response.start":  # the guard's plain-text 400; its body is dropped
                metrics.rejected("invalid_request_error")
                host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
                message = (f"this server does not answer to the host {host!r}; the hosts it answers to are "
                           f"set in ingress.allowed_hosts")
                response = JSONResponse({"error": {"type": "invalid_request_error", "message": message,
                                                   "param": "host"}}, status_code=400)
                await response(scope, receive, send)

        await self.guard(scope, receive, send_refusal)
