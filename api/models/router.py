"""GET /healthz, GET /readyz, GET /v1/models, POST /v1/models (LoRA import), GET and DELETE /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from api.errors import error_response
from api.errors_protocol import ErrorResponse
from api.models.protocol import ModelCard, ModelList
from api.models.service import ModelsService

router = APIRouter(tags=["models"])
# The probes are open (they carry no data): their own router, included without a key (api/services.py).
probes_router = APIRouter(tags=["models"])


def models_service(request: Request) -> ModelsService:
    return request.app.state.models


@probes_router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@probes_router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(models: ModelsService = Depends(models_service)):
    """200 once every model deployment answers; 503 with Retry-After while any is starting."""
    problems = await models.not_ready()
    if problems:
        return error_response(503, "not_ready", "not ready: " + "; ".join(problems), None, {"Retry-After": "5"})
    return {"status": "ready", "models": sorted(models.handles)}


@router.get("/v1/models", response_model=ModelList)
async def list_models(models: ModelsService = Depends(models_service)) -> ModelList:
    return await models.list()


@router.post("/v1/models", response_model=ModelCard, status_code=201,
             responses={400: {"model": ErrorResponse}, 409: {"model": ErrorResponse}, 413: {"model": ErrorResponse}})
async def import_model(
    request: Request,
    file: UploadFile = File(..., description="A LoRA for the deployed SDXL, .safetensors, diffusers or kohya format."),
    name: str = Form(..., description="Registered name; a name the caller owns gets a new version."),
    trigger_word: str | None = Form(None),
    description: str = Form("", max_length=2000),
    public: bool = Form(False, description="Usable (read-only) by every key."),
    models: ModelsService = Depends(models_service),
) -> ModelCard:
    """Import an external LoRA: converted through diffusers' loaders, checked against the base
    model's layers, registered with a manifest that records its source. Usable at once. The file
    may be up to `ingress.max_lora_import_bytes` (413 naming `file` past it)."""
    data = await request.app.state.uploads.read(file, "file", limit=models.max_import_bytes)
    return await models.import_lora(data, name, file.filename, trigger_word, description, public)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}})
async def get_model(model_id: str, models: ModelsService = Depends(models_service)) -> ModelCard:
    """A deployed model with its limits, or a LoRA (`name` or `name:version`) with its manifest."""
    return await models.get(model_id)


@router.delete("/v1/models/{model_id:path}", responses={404: {"model": ErrorResponse}})
async def delete_model(model_id: str, models: ModelsService = Depends(models_service)) -> dict:
    """Delete a LoRA version (`name:version`): its owner's keys (scope `train`) or admin."""
    return await models.delete_lora(model_id)
