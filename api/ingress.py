"""HTTP ingress: FastAPI behind Ray Serve. Wiring only.

`IngressDeployment.__init__` builds each API area's service once (api/<area>/service.py) from the
model handles, the stores and the models' limits (derived when the app was built), and keeps
them on `app.state`; the routers (api/<area>/router.py) parse, call their service, and return.
Every error leaves through api/errors.py in one JSON shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from api.auth import AuthMiddleware
from api.config import IngressConfig
from api.errors import BodySizeLimitMiddleware, add_error_handlers
from api.errors_protocol import ErrorResponse
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
               max_body_bytes: int = 20 * 1024 * 1024) -> IngressApp:
    """The FastAPI app: every area's router, the error handlers, the body-size and auth
    middlewares, the web UI. `services` go on `app.state` (each router's dependency finds its own
    there); `api_keys`: the loaded keys (None: open mode; []: closed)."""
    app = IngressApp(
        title="Atelier",
        version="0.1.0",
        description="Generative media on Ray Serve: SDXL images (OpenAI Images shapes) and durable jobs.",
        responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
    )
    app.state.max_body_bytes = max_body_bytes
    app.add_middleware(BodySizeLimitMiddleware, limit_of=lambda: app.state.max_body_bytes)
    app.state.api_keys = api_keys
    app.add_middleware(AuthMiddleware, keys_of=lambda: app.state.api_keys)  # added last: runs first
    add_error_handlers(app)
    for area_router in ROUTERS:
        app.include_router(area_router)
    app.mount("/ui", StaticFiles(directory=WEB_ROOT), name="ui")
    app.add_api_route("/", web_ui, include_in_schema=False)
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
        return create_app(self.services, self.api_keys, self.config.max_upload_bytes)
