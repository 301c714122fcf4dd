"""HTTP ingress: FastAPI behind Ray Serve. Wiring only.

`IngressDeployment.__init__` builds each API area's service once (api/<area>/service.py) from the
model handles, the stores and the models' limits (derived when the app was built), and keeps
them on `app.state`; the routers (api/<area>/router.py) parse, call their service, and return.
Every error leaves through api/errors.py in one JSON shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from api.auth import NO_LIMITS, PUBLIC, READ_ONLY, AuthMiddleware, rule_of
from api.config import IngressConfig
from api.errors import BodySizeLimitMiddleware, add_error_handlers
from api.errors_protocol import ErrorResponse
from api.security import (DEFAULT_ALLOWED_HOSTS, DEFAULT_CSP, HostAllowListMiddleware, MediaTypeMiddleware,
                          SecurityHeadersMiddleware)
from api.services import ROUTERS, Services, build_services

logger = logging.getLogger("ray.serve")

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"  # the web UI: plain ES modules, no build step


class IngressApp(FastAPI):
    """FastAPI whose overload handlers stay ours: Serve registers plain-text ones (no error shape,
    no Retry-After for an unavailable deployment) when the replica starts."""

    PINNED = (BackPressureError, DeploymentUnavailableError)

    def add_exception_handler(self, exc_class_or_status_code, handler) -> None:
        if exc_class_or_status_code in self.PINNED and exc_class_or_status_code in self.exception_handlers:
            return
        super().add_exception_handler(exc_class_or_status_code, handler)


def create_app(services: Services | None = None, api_keys: list | None = None,
               max_body_bytes: int = 20 * 1024 * 1024, *, allowed_hosts: list[str] | None = None,
               cors_origins: list[str] = (), content_security_policy: str = DEFAULT_CSP) -> IngressApp:
    """The FastAPI app: every area's router (each route with its access rule), the error handlers,
    the middlewares, the web UI. `services` go on `app.state` (each router's dependency finds its
    own there); `api_keys`: the loaded keys (None: open mode; []: closed); `allowed_hosts`: the
    Host allow-list (default: loopback only); `cors_origins`: browser origins allowed (none).

    Middlewares, outermost first: hardening headers on every answer; the Host allow-list; CORS
    (only with origins); the key and its route's scope; the body's media type; the body's size.
    """
    app = IngressApp(
        title="Atelier",
        version="0.1.0",
        description="Generative media on Ray Serve: SDXL images (OpenAI Images shapes) and durable jobs.",
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
                   503: {"model": ErrorResponse}},
    )

    def routes():  # read per request: the routes are added below
        return app.router.routes

    app.state.max_body_bytes = max_body_bytes

    def body_limit(scope) -> int:
        """max_upload_bytes per file, except a LoRA import (POST /v1/models): its own bound."""
        models = getattr(app.state, "models", None)
        if scope.get("method") == "POST" and scope.get("path") == "/v1/models" and models is not None:
            return models.max_import_bytes
        return app.state.max_body_bytes

    app.add_middleware(BodySizeLimitMiddleware, limit_of=body_limit)
    app.add_middleware(MediaTypeMiddleware, routes_of=routes)
    app.state.api_keys = api_keys
    app.add_middleware(AuthMiddleware, keys_of=lambda: app.state.api_keys, routes_of=routes,
                       trusted_origins=tuple(cors_origins), limiter_of=lambda: getattr(app.state, "rate", None) or NO_LIMITS)
    if cors_origins:  # off unless configured: only this server's own pages call it from a browser
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "PUT", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Prefer", "Accept"],
                           expose_headers=["Location", "Retry-After"], max_age=600)
    app.add_middleware(HostAllowListMiddleware, allowed_hosts=list(allowed_hosts or DEFAULT_ALLOWED_HOSTS))
    app.add_middleware(SecurityHeadersMiddleware, routes_of=routes, csp=content_security_policy,
                       docs_paths=(app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url))
    add_error_handlers(app)
    for area, rule in ROUTERS:
        for area_router in [area] if isinstance(area, APIRouter) else area(services):
            app.include_router(area_router, dependencies=[Depends(rule)])
    app.mount("/ui", StaticFiles(directory=WEB_ROOT), name="ui")
    app.add_api_route("/", web_ui, include_in_schema=False, dependencies=[Depends(PUBLIC)])
    for route in app.router.routes:
        if route.name == "ui":
            route.access = PUBLIC  # the UI's static files hold no data
        elif getattr(route, "path", None) in (app.openapi_url, app.docs_url, app.redoc_url,
                                              app.swagger_ui_oauth2_redirect_url):
            route.access = READ_ONLY
        elif isinstance(route, APIRoute) and rule_of(route) is None:  # fail closed, at build time
            raise RuntimeError(f"route {sorted(route.methods)} {route.path} has no access rule (RequireScope)")
    if services is not None:
        for name, service in vars(services).items():
            setattr(app.state, name, service)
    return app


def web_ui() -> FileResponse:
    return FileResponse(WEB_ROOT / "index.html", headers={"Cache-Control": "no-cache"})


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()  # the app is built per replica, by __serve_build_asgi_app__, around its services
class IngressDeployment:
    def __init__(self, config: IngressConfig | dict, sdxl: DeploymentHandle,
                 job_runner: DeploymentHandle | None = None, limits: dict[str, BaseModel] | None = None,
                 **handles: DeploymentHandle | None):
        self.config = IngressConfig.model_validate(config)
        # Fail closed, first: a replica without keys in keys mode does not start (serve status says why).
        self.api_keys = self.config.auth.enforced_keys()
        self.job_runner = job_runner  # bound so the consumer is part of the app; talked to via the queue
        # Model deployments by name (sdxl, svd, upscaler, llm, ...); None where not deployed.
        models = {"sdxl": sdxl, **{name: handle for name, handle in handles.items() if handle}}
        self.services = build_services(self.config, models, limits or {})
        if self.api_keys is None:
            logger.warning("ingress.auth.mode is open: every route is open. Fine for the local default on a "
                           "trusted machine; never on a shared network.")

    def __serve_build_asgi_app__(self) -> IngressApp:
        config = self.config
        return create_app(self.services, self.api_keys, config.max_upload_bytes, allowed_hosts=config.allowed_hosts,
                          cors_origins=config.cors_origins, content_security_policy=config.content_security_policy)
