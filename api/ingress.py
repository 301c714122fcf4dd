"""HTTP ingress: FastAPI behind Ray Serve. OpenAI shapes for images; a job API for long work.

Routes validate input, then either await a model deployment (sync) or write a durable job and
enqueue it (`?async=true` or `Prefer: respond-async`, answered 202). Every error, whatever its
origin, leaves through `error_response` in one JSON shape.
"""


import asyncio
import base64
import json
import logging
import mimetypes
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.datasets import router as datasets_api
from api.fine_tuning import router as fine_tuning_api
from api.text import router as text_api
from api.workflows import router as workflows_api
from api.videos import router as videos_api
from deployments import metrics
from api.auth import AuthConfig, AuthMiddleware
from deployments.errors import AtelierError, InvalidRequestError, NotFoundError, OverloadedError, PayloadTooLargeError
from graphs.job_runner import JobQueueConfig, new_task_id, send_job
from deployments.media import check_size, decode_image, parse_size
from api.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    JobList,
    JobOutputView,
    JobView,
    ModelCard,
    ModelList,
)
from deployments.styles import StylePreset
from deployments.llm.contract import GemmaConfig, RefinedPrompt, RefineRequest, RefineSettings, build_refine_chat
from deployments.sdxl.deployment import SDXLRequest, SDXLResponse, check_denoising_steps, routed
from graphs.pipelines import apply_refined
from storage.fs import Storage
from storage.jobs import JobStore
from storage.fs import InvalidKeyError, ObjectNotFoundError
from storage.jobs import TERMINAL_STATUSES, JobNotFoundError, JobRecord
from storage.datasets import is_dataset_image_key
from storage.keys import new_id
from storage.registry import LoraRecord, LoraRegistry, LoraRegistryError
from storage.url_import import DatasetImportConfig

logger = logging.getLogger("ray.serve")

SERVED_PREFIXES = ("outputs/",)
WEB_ROOT = Path(__file__).resolve().parents[1] / "web"  # the web UI: plain ES modules, no build step


class IngressConfig(BaseModel):
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    queue: JobQueueConfig
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_upload_pixels: int = Field(4096 * 4096, gt=0)
    presign_urls: bool = Field(True, description="With S3 storage, output URLs are presigned S3 URLs.")
    sse_poll_s: float = 0.25
    readiness_timeout_s: float = Field(5.0, gt=0)
    dataset_import: DatasetImportConfig = Field(
        DatasetImportConfig(), description="URL/prefix import limits and the private-host allow-list.")
    llm: GemmaConfig | None = Field(None, description="The deployed Gemma, if any (filled in by the app builder).")
    auth: AuthConfig = Field(AuthConfig(), description="API keys (SHA-256 hashes), their scopes, and the mode.")
    max_workflow_nodes: int = Field(200, ge=1, le=500, description="Nodes a user workflow may have.")
    fine_tuning: fine_tuning_api.FineTuningConfig = Field(
        fine_tuning_api.FineTuningConfig(), description="POST /v1/fine_tuning/jobs: Ray job address and run defaults.")


# Job inputs that are internal plumbing, not the user's settings.
PRIVATE_PARAMS = frozenset({"config", "chat", "store", "output_id"})


def public_params(request: Any) -> Any:
    """A job's request as its user gave it (prompt, seed, model, LoRA...): its lineage."""
    if isinstance(request, dict):
        return {k: public_params(v) for k, v in request.items() if k not in PRIVATE_PARAMS}
    if isinstance(request, list):
        return [public_params(v) for v in request]
    return request


# --- errors: one shape, one place -------------------------------------------------------------


def error_response(status: int, type_: str, message: str, param: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param_of(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "form", "header")]
    return ".".join(parts) or None


async def _atelier_error(request: Request, exc: Exception) -> JSONResponse:
    exc = getattr(exc, "cause", exc)  # a RayTaskError wraps what the replica raised
    if exc.status_code < 500 or exc.status_code == 503:
        metrics.rejected(exc.error_type)
    return error_response(exc.status_code, exc.error_type, exc.message, exc.param, exc.headers)


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
    # which re-raises. Pinned on the app (_IngressApp), or Serve replaces it with a plain-text one.
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
    if isinstance(cause, text_api.VLLMClientError):  # raised by vLLM's request models' validators
        return await _atelier_error(request, text_api.invalid_request(cause))
    if isinstance(cause, BackPressureError):
        return await _backpressure(request, cause)
    if isinstance(cause, DeploymentUnavailableError):
        return await _unavailable(request, cause)
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "server_error", "internal error; it has been logged", None)


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
        limit = allowed = self.limit_of()
        if headers.get(b"content-type", b"").startswith(b"multipart/form-data"):
            # max_upload_bytes is per file (read_upload checks it exactly); boundaries, part headers
            # and the small form fields come on top, so a file of exactly the limit still fits.
            allowed += MULTIPART_OVERHEAD_BYTES
        path = scope.get("path", "")
        param = ("image" if path.endswith(("/images/edits", "/images/upscale"))
                 else "input_reference" if path.endswith("/v1/videos")
                 else "files" if path.endswith("/images") else "body")
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
        response = error_response(413, PayloadTooLargeError.error_type,
                                  f"{param} upload is {size} bytes, over the limit of {limit} bytes", param,
                                  {"Connection": "close"})
        await response(scope, receive, send)


class _IngressApp(FastAPI):
    """FastAPI whose overload handlers stay ours: Serve registers plain-text ones (no error shape,
    no Retry-After for an unavailable deployment) when the replica starts."""

    PINNED = (BackPressureError, DeploymentUnavailableError)

    def add_exception_handler(self, exc_class_or_status_code, handler) -> None:
        if exc_class_or_status_code in self.PINNED and exc_class_or_status_code in self.exception_handlers:
            return
        super().add_exception_handler(exc_class_or_status_code, handler)


app = _IngressApp(
    title="Atelier",
    version="0.1.0",
    description="Generative media on Ray Serve: SDXL images (OpenAI Images shapes) and durable jobs.",
    responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
app.state.max_body_bytes = 20 * 1024 * 1024
app.add_middleware(BodySizeLimitMiddleware, limit_of=lambda: app.state.max_body_bytes)
app.state.api_keys = []
app.add_middleware(AuthMiddleware, keys_of=lambda: app.state.api_keys)  # added last: runs first
app.add_exception_handler(AtelierError, _atelier_error)
app.add_exception_handler(RequestValidationError, _validation_error)
app.add_exception_handler(ValidationError, _validation_error)
app.add_exception_handler(StarletteHTTPException, _http_error)
app.add_exception_handler(BackPressureError, _backpressure)
app.add_exception_handler(DeploymentUnavailableError, _unavailable)
app.add_exception_handler(Exception, _unexpected_error)
app.include_router(text_api.router)
app.include_router(videos_api.router)
app.include_router(datasets_api.router)
app.include_router(fine_tuning_api.router)
app.include_router(workflows_api.router)
app.mount("/ui", StaticFiles(directory=WEB_ROOT), name="ui")


@app.get("/", include_in_schema=False)
def web_ui() -> FileResponse:
    return FileResponse(WEB_ROOT / "index.html", headers={"Cache-Control": "no-cache"})


class ModelNotDeployedError(AtelierError):
    status_code = 404
    error_type = "model_not_found"


def _wants_async(request: Request, async_flag: bool) -> bool:
    return async_flag or "respond-async" in request.headers.get("prefer", "")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class IngressDeployment:
    def __init__(self, config: IngressConfig | dict, sdxl: DeploymentHandle,
                 job_runner: DeploymentHandle | None = None, **handles: DeploymentHandle | None):
        from ray.serve.task_consumer import instantiate_adapter_from_config

        self.config = IngressConfig.model_validate(config)
        # Fail closed, first: a replica without keys in keys mode does not start (serve status says why).
        api_keys = self.config.auth.enforced_keys()
        self.sdxl = sdxl
        self.job_runner = job_runner  # bound so the consumer is part of the app; talked to via the queue
        # Other model deployments by name (svd, upscaler, llm, ...); None where not deployed.
        self.handles: dict[str, DeploymentHandle] = {"sdxl": sdxl, **{k: v for k, v in handles.items() if v}}
        app.state.ingress = self  # area routers (api/) reach the replica through this
        self.storage = Storage(self.config.storage_root, self.config.storage_options)
        self.jobs = JobStore(self.storage)
        self.loras = LoraRegistry(self.storage)
        self.queue = instantiate_adapter_from_config(self.config.queue.task_processor_config())
        self._sdxl_info: dict | None = None
        self._model_info: dict[str, dict] = {}
        self.llm_info: dict | None = self.config.llm.describe() if self.config.llm else None
        self.llm_settings: RefineSettings = self.config.llm.refine if self.config.llm else RefineSettings()
        app.state.max_body_bytes = self.config.max_upload_bytes
        app.state.api_keys = api_keys
        if api_keys is None:
            logger.warning("ingress.auth.mode is open: every route is open. Fine for the local default on a "
                           "trusted machine; never on a shared network.")

    # --- health and models ----------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz(self):
        """200 once every model deployment answers; 503 with Retry-After while any is starting."""
        async def probe(name: str, handle: DeploymentHandle) -> str | None:
            try:
                await asyncio.wait_for(handle.check_health.remote(), timeout=self.config.readiness_timeout_s)
                return None
            except Exception as exc:  # starting, unhealthy or unreachable: all mean not ready
                return f"{name}: {type(exc).__name__}"

        problems = [p for p in await asyncio.gather(*(probe(n, h) for n, h in self.handles.items())) if p]
        if problems:
            return error_response(503, "not_ready", "not ready: " + "; ".join(problems), None, {"Retry-After": "5"})
        return {"status": "ready", "models": sorted(self.handles)}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        info = await self.sdxl_info()
        card = ModelCard(
            id=info["model"], kind="image", capabilities=["images.generations", "images.edits"],
            metadata={k: info[k] for k in ("source", "default_size", "min_size", "max_size", "default_steps",
                                           "max_steps", "allowed_n", "styles")},
        )
        cards = [card]
        if self.llm_info is not None and "llm" in self.handles:
            cards.append(ModelCard(id=self.llm_info["model"], kind="text",
                                   capabilities=["chat.completions", "completions", "prompts.refine"],
                                   metadata={"source": self.llm_info["source"],
                                             "max_model_len": self.llm_info["max_model_len"]}))
        for record in await asyncio.to_thread(self.loras.list, None, True):
            cards.append(ModelCard(
                id=record.id, created=int(record.created_at), kind="lora", capabilities=["images.generations"],
                metadata={"name": record.name, "version": record.version, "base": info["model"],
                          "size_bytes": record.size_bytes, **record.manifest.model_dump(mode="json")}))
        return ModelList(data=cards)

    async def sdxl_info(self) -> dict:
        if self._sdxl_info is None:
            self._sdxl_info = await self.sdxl.describe.remote()
        return self._sdxl_info

    async def model_info(self, name: str) -> dict:
        """`describe()` of a deployed model ("svd", "upscaler", ...), cached; 404 if it is not deployed."""
        if name not in self._model_info:
            if name not in self.handles:
                raise ModelNotDeployedError(f"no {name!r} model is deployed in this application", "model")
            self._model_info[name] = await self.handles[name].describe.remote()
        return self._model_info[name]

    async def style_preset(self, name: str | None) -> StylePreset | None:
        if name is None:
            return None
        styles = (await self.sdxl_info())["styles"]
        if name not in styles:
            raise InvalidRequestError(f"unknown style {name!r}; known: {sorted(styles)}", "style")
        return StylePreset.model_validate(styles[name])

    async def lora_record(self, ref: str | None) -> LoraRecord | None:
        """The registered LoRA a request names (read from storage each time, so a new one is usable at once)."""
        if ref is None:
            return None
        try:
            return await asyncio.to_thread(self.loras.resolve, ref)
        except LoraRegistryError as exc:
            raise InvalidRequestError(f"unknown LoRA {ref!r}: {exc.message}; GET /v1/models lists registered "
                                      "adapters", "lora") from None

    async def lora_trigger_word(self, name: str | None) -> str | None:
        record = await self.lora_record(name)
        return record.trigger_word if record else None

    # --- images ---------------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={202: {"model": JobView, "description": "Accepted as a job (?async=true)."}})
    async def create_images(self, body: ImageGenerationRequest, request: Request,
                            async_: bool = Query(False, alias="async", description="Run as a job; answer 202.")):
        sdxl_request = await self._sdxl_request(body, mode="text_to_image")
        refine = await self._refine_payload(body) if body.refine else None
        if body.upscale:  # text-to-image-hd: SDXL → x4 upscaler
            return await videos_api.generate_hd(self, body, sdxl_request, refine, request,
                                                _wants_async(request, async_))
        if _wants_async(request, async_):
            payload = {**self._sdxl_payload(sdxl_request), "refine": refine}
            stages = ["refine", "generate"] if refine else ["generate"]
            return await self.submit_job("images.generations", payload, request, stages)
        refined = None
        if refine is not None:
            refined = await text_api.refine_prompt(self, RefineRequest.model_validate(refine["request"]))
            sdxl_request = SDXLRequest.model_validate(apply_refined(sdxl_request.model_dump(), refined))
        return await self._generate(sdxl_request, body.response_format, request, refined)

    @app.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={202: {"model": JobView}, 413: {"model": ErrorResponse}})
    async def edit_images(
        self,
        request: Request,
        image: UploadFile = File(..., description="PNG, JPEG or WebP to edit."),
        prompt: str = Form(...),
        mask: UploadFile | None = File(None, description="Inpainting mask, same size as image; white is repainted."),
        model: str | None = Form(None),
        n: int = Form(1),
        size: str | None = Form(None),
        response_format: Literal["url", "b64_json"] = Form("url"),
        negative_prompt: str | None = Form(None),
        seed: int | None = Form(None),
        steps: int | None = Form(None),
        guidance_scale: float | None = Form(None),
        strength: float = Form(0.8, gt=0, le=1),
        style: str | None = Form(None),
        async_: bool = Query(False, alias="async"),
    ):
        body = ImageGenerationRequest(
            prompt=prompt, model=model, n=n, size=size, response_format=response_format,
            negative_prompt=negative_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, style=style,
        )
        image_bytes = await self.read_upload(image, "image")
        mask_bytes = await self.read_upload(mask, "mask") if mask is not None else None
        # Decode here so a bad upload is a 400 now, not a failed job later; SDXL takes inputs of
        # at most its largest size in pixels (SDXLDeployment._load_input).
        max_pixels = min(self.config.max_upload_pixels, (await self.sdxl_info())["max_size"] ** 2)
        decoded = decode_image(image_bytes, "image", max_pixels=max_pixels)
        if mask_bytes is not None:
            decoded_mask = decode_image(mask_bytes, "mask", max_pixels=max_pixels, mode="L")
            if decoded_mask.size != decoded.size:
                raise InvalidRequestError(
                    f"mask is {decoded_mask.width}x{decoded_mask.height} but image is "
                    f"{decoded.width}x{decoded.height}; they must match", "mask")
        sdxl_request = await self._sdxl_request(
            body, mode="inpaint" if mask_bytes is not None else "image_to_image", strength=strength,
            default_size=(decoded.width // 8 * 8, decoded.height // 8 * 8),
        )
        if _wants_async(request, async_):
            upload_id = new_id("upload")
            sdxl_request.image_key = await asyncio.to_thread(
                self.storage.put_bytes, f"uploads/{upload_id}/image", image_bytes)
            if mask_bytes is not None:
                sdxl_request.mask_key = await asyncio.to_thread(
                    self.storage.put_bytes, f"uploads/{upload_id}/mask", mask_bytes)
            return await self.submit_job("images.edits", self._sdxl_payload(sdxl_request), request, ["generate"])
        sdxl_request.image, sdxl_request.mask = image_bytes, mask_bytes
        return await self._generate(sdxl_request, body.response_format, request)

    async def _refine_payload(self, body: ImageGenerationRequest) -> dict:
        """What a job needs to run the refine stage: the request and the chat body to send."""
        text_api.llm_handle(self, None)  # 404 now, not a failed job, when no LLM is deployed
        refine_request = RefineRequest(prompt=body.prompt, style=body.style, lora=body.lora, seed=body.seed)
        style = await self.style_preset(body.style)
        trigger_word = await self.lora_trigger_word(body.lora)
        chat = build_refine_chat(refine_request, self.llm_info["model"], self.llm_settings, style, trigger_word)
        return {"request": refine_request.model_dump(mode="json"), "chat": chat, "trigger_word": trigger_word}

    async def read_upload(self, upload: UploadFile, param: str) -> bytes:
        limit = self.config.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise PayloadTooLargeError(f"{param} is {upload.size} bytes, over the limit of {limit} bytes", param)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError(f"{param} is over the limit of {limit} bytes", param)
        return data

    async def _sdxl_request(self, body: ImageGenerationRequest, mode: str, strength: float = 0.8,
                            default_size: tuple[int, int] | None = None) -> SDXLRequest:
        """Check the request against the model's limits, so jobs never fail on bad input."""
        info = await self.sdxl_info()
        if body.model is not None and body.model != info["model"]:
            raise InvalidRequestError(f"unknown model {body.model!r}; available: [{info['model']!r}]", "model")
        lora = await self.lora_record(body.lora)
        if body.style is not None and body.style not in info["styles"]:
            raise InvalidRequestError(f"unknown style {body.style!r}; known: {sorted(info['styles'])}", "style")
        if body.steps is not None and body.steps > info["max_steps"]:
            raise InvalidRequestError(f"steps must be at most {info['max_steps']}; got {body.steps}", "steps")
        check_denoising_steps(mode, body.steps or info["default_steps"], strength)
        if body.size is not None:
            width, height = parse_size(body.size)
        else:
            width, height = default_size or (info["default_size"], info["default_size"])
        check_size(width, height, min_size=info["min_size"], max_size=info["max_size"])
        return SDXLRequest(
            mode=mode, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=width,
            height=height, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
            strength=strength, style=body.style, lora=lora.id if lora else None, lora_scale=body.lora_scale,
        )

    async def _generate(self, sdxl_request: SDXLRequest, response_format: str, request: Request,
                        refined: RefinedPrompt | None = None) -> ImagesResponse:
        store = response_format == "url"
        if store:
            sdxl_request.store, sdxl_request.output_id = True, new_id("img")
        result: SDXLResponse = await routed(self.sdxl, sdxl_request).generate.remote(sdxl_request)
        data = []
        for image in result.images:
            if store:
                data.append(ImageData(url=self.url_for(image.key, request), seed=image.seed,
                                      revised_prompt=result.prompt))
            else:
                data.append(ImageData(b64_json=base64.b64encode(image.png).decode(), seed=image.seed,
                                      revised_prompt=result.prompt))
        first = result.images[0]
        return ImagesResponse(created=int(time.time()), data=data, model=result.model,
                              size=f"{first.width}x{first.height}", steps=result.steps,
                              elapsed_s=round(result.elapsed_s, 4), batch_images=result.batch_images,
                              refine=refined.model_dump() if refined else None)

    # --- jobs -----------------------------------------------------------------------------------

    @staticmethod
    def _sdxl_payload(sdxl_request: SDXLRequest) -> dict:
        return {"sdxl": sdxl_request.model_dump(mode="json", exclude={"image", "mask"})}

    async def submit_job(self, kind: str, payload: dict, request: Request,
                         stages: list[str] | None = None) -> JSONResponse:
        """Durably record a job, enqueue it, and answer 202 with its view."""
        record = await asyncio.to_thread(self.create_and_enqueue, kind, payload, stages)
        view = self.job_view(record, request)
        return JSONResponse(view.model_dump(mode="json"), status_code=202,
                            headers={"Location": f"/v1/jobs/{record.id}"})

    def create_and_enqueue(self, kind: str, payload: dict, stages: list[str] | None = None) -> JobRecord:
        depth = self.jobs.count_active()
        if depth >= self.config.queue.max_queue_depth:
            raise OverloadedError(f"the job queue is full ({depth} unfinished jobs); retry later", retry_after=5)
        # The queue depth gauge is reported by the job runners (JobRunnerDeployment.report_queue_depth),
        # which also see jobs finish; a value set here would never be lowered.
        record = self.jobs.create(kind, payload, stages=stages or [], max_attempts=self.config.queue.max_attempts,
                                  task_id=new_task_id())
        try:
            send_job(self.queue, record)
        except Exception as exc:
            logger.exception("enqueue of job %s failed", record.id)
            self.jobs.update(record.id, status="failed", finished_at=time.time(),
                             error={"type": "queue_unavailable", "message": f"could not enqueue: {exc}"})
            raise OverloadedError("the job queue is unavailable; retry later", retry_after=5) from exc
        return record

    @app.get("/v1/jobs", response_model=JobList)
    def list_jobs(self, request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None,
                  status: Literal["queued", "in_progress", "completed", "failed", "cancelled"] | None = None,
                  kind: str | None = None) -> JobList:
        records = self.jobs.list(limit=limit + 1, after=after, status=status, kind=kind)
        views = [self.job_view(r, request) for r in records[:limit]]
        return JobList(data=views, has_more=len(records) > limit, last_id=views[-1].id if views else None)

    @app.get("/v1/jobs/{job_id}", response_model=JobView)
    def get_job(self, job_id: str, request: Request) -> JobView:
        return self.job_view(self.get_job_record(job_id), request)

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView)
    def cancel_job(self, job_id: str, request: Request) -> JobView:
        self.get_job_record(job_id)
        return self.job_view(self.jobs.request_cancel(job_id), request)

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(self, job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: one `job` event per change, ending with the terminal state."""
        await asyncio.to_thread(self.get_job_record, job_id)

        async def events():
            last = None
            while True:
                record = await asyncio.to_thread(self.jobs.get_with_cancel, job_id)
                view = self.job_view(record, request).model_dump(mode="json")
                if view != last:
                    yield f"event: job\ndata: {json.dumps(view)}\n\n"
                    last = view
                if record.status in TERMINAL_STATUSES:
                    yield "event: done\ndata: [DONE]\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(self.config.sse_poll_s)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def get_job_record(self, job_id: str) -> JobRecord:
        try:
            return self.jobs.get_with_cancel(job_id)
        except JobNotFoundError:
            raise NotFoundError(f"no job with id {job_id!r}", "job_id") from None

    def job_view(self, record: JobRecord, request: Request) -> JobView:
        data = record.model_dump(mode="json")
        data["params"] = public_params(record.request)
        data["outputs"] = [
            JobOutputView(url=self.url_for(o.key, request), **o.model_dump(include={
                "key", "content_type", "width", "height", "seed", "extra"}))
            for o in record.outputs
        ]
        return JobView.model_validate(data)

    # --- files ----------------------------------------------------------------------------------

    def url_for(self, key: str, request: Request) -> str:
        if self.config.presign_urls and self.storage.protocol != "file":
            signed = self.storage.presign(key)
            if signed:
                return signed
        return f"{str(request.base_url).rstrip('/')}/v1/files/{key}"

    @app.get("/v1/files/{key:path}", responses={200: {"content": {"image/png": {}, "video/mp4": {}}}})
    def get_file(self, key: str):
        if not (key.startswith(SERVED_PREFIXES) or is_dataset_image_key(key)):
            raise NotFoundError(f"no file {key!r}", "key")
        try:
            if self.config.presign_urls and self.storage.protocol != "file":
                if not self.storage.exists(key):
                    raise ObjectNotFoundError(key)
                return RedirectResponse(self.storage.presign(key), status_code=307)
            size = self.storage.size(key)
            handle = self.storage.open(key)
        except (InvalidKeyError, ObjectNotFoundError, FileNotFoundError):
            raise NotFoundError(f"no file {key!r}", "key") from None

        def chunks():
            with handle:
                while chunk := handle.read(1 << 20):
                    yield chunk

        media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
        return StreamingResponse(chunks(), media_type=media_type, headers={"Content-Length": str(size)})
