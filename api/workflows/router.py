"""User workflows (node graphs over the deployments), saved workflows, and job replay.

    GET    /v1/workflows/schema        the workflow JSON Schema and the node type catalogue
    POST   /v1/workflows/validate      every problem with its node id and field, and the execution order
    POST   /v1/workflows/runs          run a workflow (inline, or a saved one by id and version) as one job: 202
    POST   /v1/workflows               save a workflow: id, version 1
    GET    /v1/workflows               saved workflows (latest versions)
    GET    /v1/workflows/{id}          a saved workflow (`?version=N`; default the latest)
    PUT    /v1/workflows/{id}          a new version
    DELETE /v1/workflows/{id}          every version
    POST   /v1/jobs/{id}/replay        run a finished job again from its recorded request, seeds pinned

Workflow checks that need the running models (deployed node types, size and step limits, styles,
LoRAs) are added here to graphs/workflows.py's structural ones, so a run is refused up front
with every problem listed (400), and a job fails only for reasons that could not be seen.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, ValidationError

from api import current_ingress
from deployments.errors import AtelierError, ConflictError, InvalidRequestError, NotFoundError, parse_json
from api.videos.router import check_upscalable
from deployments.media import check_size, parse_size
from deployments.diffusion import MAX_SEED, random_seed
from deployments.sdxl.deployment import check_denoising_steps
from graphs.workflows import (NODE_TYPES, Node, ValidationReport, Workflow, WorkflowIssue, validate_workflow,
                              workflow_schema)
from storage.fs import InvalidKeyError, ObjectNotFoundError
from storage.jobs import JobRecord
from storage.keys import new_id

router = APIRouter(tags=["workflows"])

SAVED_PREFIX = "workflows/saved/"
SDXL_NODE_TYPES = ("text_to_image", "image_to_image", "inpaint")


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON Schema with its `$defs` inlined: an OpenAPI requestBody cannot use them."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


def _json_request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that the route parses itself (so that it can list
    every problem at once), for clients and for the schemathesis fuzz."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class WorkflowRunRequest(BaseModel):
    model_config = {"extra": "forbid"}

    workflow: dict[str, Any] | None = Field(None, description="An inline workflow document.")
    workflow_id: str | None = Field(None, description="A saved workflow; runs its `version` (default latest).")
    version: int | None = Field(None, ge=1)
    use_cache: bool = Field(True, description="Reuse a node's stored output when its inputs and params match.")


class SavedWorkflowBody(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    workflow: dict[str, Any]


class SavedWorkflow(BaseModel):
    object: str = "workflow"
    id: str
    name: str
    description: str
    version: int
    created_at: int
    workflow: dict[str, Any]


# --- request bodies and errors -----------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    return parse_json(await request.body(), "body")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{field}: {first['msg']}", field) from None


def invalid_workflow(report: ValidationReport) -> JSONResponse:
    """400 listing every problem; `param` names the first one's node and field."""
    first = report.errors[0]
    param = ".".join(p for p in ("nodes" if first.node else None, first.node, first.field) if p) or "workflow"
    summary = "; ".join(f"{e.node or 'workflow'}{'.' + e.field if e.field else ''}: {e.message}"
                        for e in report.errors[:10])
    body = {"error": {"type": "invalid_request_error", "param": param,
                      "message": f"the workflow has {len(report.errors)} problem(s): {summary}",
                      "errors": [e.model_dump() for e in report.errors]}}
    return JSONResponse(body, status_code=400)


# --- validation against the running application ---------------------------------------------------


def _stored_image_size(ingress, key: str) -> tuple[int, int] | str:
    """(width, height) of a stored image, read from its header; or why it cannot be used."""
    try:
        data = ingress.storage.get_bytes(key)
    except (ObjectNotFoundError, InvalidKeyError):
        return f"no stored output at {key!r}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError):
        return f"{key!r} is not an image"


class _Checks:
    """Collects every problem of a workflow against the running models, with its node and field."""

    def __init__(self) -> None:
        self.issues: list[WorkflowIssue] = []

    def add(self, node: str, field: str, message: str) -> None:
        self.issues.append(WorkflowIssue(node=node, field=field, message=message))

    def size(self, node: str, field: str, width: int, height: int, **limits: int) -> bool:
        try:
            check_size(width, height, param=field.rsplit(".", 1)[-1], **limits)
        except AtelierError as exc:
            self.add(node, field, exc.message)
            return False
        return True


def _check_sdxl_node(checks: _Checks, node: Node, sdxl: dict, image: tuple[int, int] | None,
                     mask: tuple[int, int] | None) -> tuple[int, int] | None:
    """The SDXL deployment's own checks (SDXLDeployment.check_inputs); the images' size if known."""
    params = node.params
    size = None
    if params.get("size"):
        size = parse_size(params["size"])
        if not checks.size(node.id, "params.size", *size, min_size=sdxl["min_size"], max_size=sdxl["max_size"]):
            size = None
    elif node.type == "text_to_image":
        size = (sdxl["default_size"], sdxl["default_size"])
    elif image is not None:  # the input image's size, rounded down to a multiple of 8
        size = (image[0] // 8 * 8, image[1] // 8 * 8)
        if not checks.size(node.id, "inputs.image", *size, min_size=sdxl["min_size"], max_size=sdxl["max_size"]):
            size = None
    if node.type != "text_to_image":
        try:
            check_denoising_steps(node.type, params.get("steps") or sdxl["default_steps"], params.get("strength", 0.8))
        except AtelierError as exc:
            checks.add(node.id, "params.steps", exc.message)
    if params.get("seed") is not None and params["seed"] + params.get("n", 1) - 1 > MAX_SEED:
        checks.add(node.id, "params.seed", f"seed + n - 1 must be at most {MAX_SEED} (image i uses seed + i)")
    if node.type == "inpaint" and image is not None and mask is not None and image != mask:
        checks.add(node.id, "inputs.mask", f"mask is {mask[0]}x{mask[1]} but image is {image[0]}x{image[1]}; "
                                           "they must match")
    return size


def _check_upscale_node(checks: _Checks, node: Node, up: dict, image: tuple[int, int] | None) -> tuple[int, int] | None:
    """The upscaler's limits, as POST /v1/images/upscale checks them; the output size if known."""
    params = node.params
    if params.get("steps") is not None and params["steps"] > up["max_steps"]:
        checks.add(node.id, "params.steps", f"steps must be at most {up['max_steps']}; got {params['steps']}")
    if params.get("noise_level") is not None and params["noise_level"] > up["max_noise_level"]:
        checks.add(node.id, "params.noise_level",
                   f"noise_level must be at most {up['max_noise_level']}; got {params['noise_level']}")
    if image is None:
        return None
    try:
        check_upscalable(up, *image, "inputs.image", "the input image")
    except AtelierError as exc:
        checks.add(node.id, "inputs.image", exc.message)
        return None
    return image[0] * up["scale"], image[1] * up["scale"]


def _check_video_node(checks: _Checks, node: Node, svd: dict) -> None:
    """SVD's limits, as POST /v1/videos checks them (frames, rate, size, steps)."""
    params = node.params
    frames, fps, steps = params.get("num_frames"), params.get("fps"), params.get("steps")
    if frames is not None and not 1 <= frames <= svd["max_num_frames"]:
        checks.add(node.id, "params.num_frames", f"num_frames must be between 1 and {svd['max_num_frames']}; "
                                                 f"got {frames}")
    if fps is not None and not svd["min_fps"] <= fps <= svd["max_fps"]:
        checks.add(node.id, "params.fps", f"fps must be between {svd['min_fps']} and {svd['max_fps']}; got {fps}")
    if steps is not None and steps > svd["max_steps"]:
        checks.add(node.id, "params.steps", f"steps must be at most {svd['max_steps']}; got {steps}")
    if params.get("size"):
        checks.size(node.id, "params.size", *parse_size(params["size"]), min_size=svd["min_size"],
                    max_size=svd["max_size"], multiple=svd["size_multiple"])


async def check_workflow(ingress, doc: Any) -> tuple[ValidationReport, Workflow | None]:
    """Structural checks, then each node's params against the model that runs it (SDXL's sizes,
    steps, styles and LoRAs; SVD's frames, rate, size and steps; the upscaler's steps, noise
    level and input size), and that stored images and masks exist. Every problem is reported.

    Image sizes are followed through the graph where they are known before running (a size
    param, a model's default, a stored image, x4 after an upscale), so an upscale of an image
    too large for the upscaler is refused here rather than failing in the job."""
    sdxl = await ingress.sdxl_info()
    limits = {t: {"max_steps": sdxl["max_steps"]} for t in SDXL_NODE_TYPES}
    report = validate_workflow(doc, available_deployments=set(ingress.handles),
                               limits=limits, max_nodes=ingress.config.max_workflow_nodes)
    if not report.valid:
        return report, None
    workflow = Workflow.model_validate(doc)
    types = {node.type for node in workflow.nodes}
    up = await ingress.model_info("upscaler") if "upscale" in types else None
    svd = await ingress.model_info("svd") if "image_to_video" in types else None
    by_id = {node.id: node for node in workflow.nodes}
    feeds = {(edge.target, edge.target_port): edge.source for edge in workflow.edges}
    sizes: dict[str, tuple[int, int] | None] = {}  # node id -> size of its image(s) or mask, if known
    checks = _Checks()
    for node_id in report.order:
        node, params = by_id[node_id], by_id[node_id].params

        def input_size(port: str) -> tuple[int, int] | None:
            return sizes.get(feeds.get((node_id, port), ""))

        if node.type in ("image", "mask"):
            found = await asyncio.to_thread(_stored_image_size, ingress, params["key"])
            if isinstance(found, str):
                checks.add(node_id, "params.key", found)
            else:
                sizes[node_id] = found
        elif node.type in SDXL_NODE_TYPES:
            sizes[node_id] = _check_sdxl_node(checks, node, sdxl, input_size("image"), input_size("mask"))
        elif node.type == "select":
            sizes[node_id] = input_size("images")
        elif node.type == "upscale" and up is not None:
            sizes[node_id] = _check_upscale_node(checks, node, up, input_size("image"))
        elif node.type == "image_to_video" and svd is not None:
            _check_video_node(checks, node, svd)
        if params.get("style") and params["style"] not in sdxl["styles"]:
            checks.add(node_id, "params.style", f"unknown style {params['style']!r}; known: {sorted(sdxl['styles'])}")
        if params.get("lora"):
            try:
                await ingress.lora_record(params["lora"])
            except AtelierError as exc:
                checks.add(node_id, "params.lora", exc.message)
    if checks.issues:
        return ValidationReport(valid=False, errors=checks.issues, order=report.order), None
    return report, workflow


async def _run_payload(ingress, workflow: Workflow, use_cache: bool, saved: dict | None) -> dict:
    """Seeds pinned (a run and its replay are reproducible; refine's too, as the LLM samples),
    LoRAs pinned to a version with their weights' sha256 (lineage), and what each refine node
    needs to talk to the LLM."""
    nodes = []
    refine: dict[str, dict] = {}
    loras: dict[str, dict] = {}
    for node in workflow.nodes:
        params = dict(node.params)
        if "seed" in NODE_TYPES[node.type].params.model_fields and params.get("seed") is None:
            params["seed"] = min(random_seed(), MAX_SEED - params.get("n", 1) + 1)  # image i uses seed + i
        if params.get("lora"):
            record = await ingress.lora_record(params["lora"])
            params["lora"] = record.id
            loras[record.id] = {"name": record.name, "version": record.version, "sha256": record.sha256}
        if node.type == "refine":
            style = await ingress.style_preset(params.get("style"))
            refine[node.id] = {
                "model": ingress.llm_info["model"], "source": ingress.llm_info.get("source"),
                "settings": ingress.llm_settings.model_dump(),
                "style": style.model_dump() if style else None,
                "trigger_word": await ingress.lora_trigger_word(params.get("lora")),
            }
        nodes.append({**node.model_dump(), "params": params})
    return {"workflow": {**workflow.model_dump(), "nodes": nodes}, "use_cache": use_cache, "refine": refine,
            "loras": loras, "saved": saved}


# --- routes --------------------------------------------------------------------------------------


@router.get("/v1/workflows/schema")
async def get_schema() -> dict:
    return workflow_schema()


def _with_workflow(model: type[BaseModel]) -> dict[str, Any]:
    schema = _inlined_schema(model)
    schema["properties"]["workflow"] = {**schema["properties"]["workflow"], **_inlined_schema(Workflow)}
    schema["properties"]["workflow"].pop("anyOf", None)
    return schema


@router.post("/v1/workflows/validate", response_model=ValidationReport,
             openapi_extra=_json_request_body(_inlined_schema(Workflow)))
async def validate(request: Request, ingress=Depends(current_ingress)) -> ValidationReport:
    """200 with `valid`, every problem (node id, field, message) and the execution order."""
    report, _ = await check_workflow(ingress, await _json_body(request))
    return report


@router.post("/v1/workflows/runs", status_code=202, openapi_extra=_json_request_body(_with_workflow(WorkflowRunRequest)))
async def run(request: Request, ingress=Depends(current_ingress)):
    body = _parse(WorkflowRunRequest, await _json_body(request))
    if (body.workflow is None) == (body.workflow_id is None):
        raise InvalidRequestError("give either workflow (inline) or workflow_id (saved)", "workflow")
    saved = None
    doc = body.workflow
    if body.workflow_id is not None:
        record = await asyncio.to_thread(_load_saved, ingress, body.workflow_id, body.version)
        doc, saved = record.workflow, {"id": record.id, "version": record.version, "name": record.name}
    report, workflow = await check_workflow(ingress, doc)
    if workflow is None:
        return invalid_workflow(report)
    payload = await _run_payload(ingress, workflow, body.use_cache, saved)
    return await ingress.submit_job("workflows.run", payload, request, ["workflow"])


# --- saved workflows -----------------------------------------------------------------------------


def _versions(ingress, workflow_id: str) -> list[int]:
    prefix = f"{SAVED_PREFIX}{workflow_id}/"
    versions = []
    for key in ingress.storage.list(prefix):
        name = key.rsplit("/", 1)[-1]
        if name.startswith("v") and name.endswith(".json") and name[1:-5].isdigit():
            versions.append(int(name[1:-5]))
    return sorted(versions)


def _load_saved(ingress, workflow_id: str, version: int | None = None) -> SavedWorkflow:
    if not workflow_id.replace("_", "").isalnum():
        raise NotFoundError(f"no workflow with id {workflow_id!r}", "workflow_id")
    versions = _versions(ingress, workflow_id)
    if not versions:
        raise NotFoundError(f"no workflow with id {workflow_id!r}", "workflow_id")
    version = version or versions[-1]
    try:
        return SavedWorkflow.model_validate(ingress.storage.get_json(f"{SAVED_PREFIX}{workflow_id}/v{version}.json"))
    except ObjectNotFoundError:
        raise NotFoundError(f"workflow {workflow_id} has no version {version}; it has {versions}", "version") from None


async def _save(ingress, workflow_id: str, version: int, body: SavedWorkflowBody) -> JSONResponse | SavedWorkflow:
    report, workflow = await check_workflow(ingress, body.workflow)
    if workflow is None:
        return invalid_workflow(report)
    saved = SavedWorkflow(id=workflow_id, name=body.name, description=body.description, version=version,
                          created_at=int(time.time()), workflow=workflow.model_dump())
    data = saved.model_dump_json().encode()
    key = f"{SAVED_PREFIX}{workflow_id}/v{version}.json"
    if not await asyncio.to_thread(ingress.storage.put_if_absent, key, data, "application/json"):
        raise ConflictError(f"workflow {workflow_id} version {version} was saved meanwhile; retry", "workflow_id")
    return saved


@router.post("/v1/workflows", status_code=201, response_model=SavedWorkflow,
             openapi_extra=_json_request_body(_with_workflow(SavedWorkflowBody)))
async def create_workflow(request: Request, ingress=Depends(current_ingress)):
    return await _save(ingress, new_id("wf"), 1, _parse(SavedWorkflowBody, await _json_body(request)))


@router.get("/v1/workflows")
async def list_workflows(limit: int = Query(50, ge=1, le=200), ingress=Depends(current_ingress)) -> dict:
    def latest() -> list[dict]:
        ids = sorted({key[len(SAVED_PREFIX):].split("/", 1)[0] for key in ingress.storage.list(SAVED_PREFIX)},
                     reverse=True)
        out = []
        for workflow_id in ids[:limit]:
            try:
                out.append(_load_saved(ingress, workflow_id).model_dump())
            except NotFoundError:
                continue
        return out

    return {"object": "list", "data": await asyncio.to_thread(latest)}


@router.get("/v1/workflows/{workflow_id}", response_model=SavedWorkflow)
async def get_workflow(workflow_id: str, version: int | None = Query(None, ge=1),
                       ingress=Depends(current_ingress)) -> SavedWorkflow:
    return await asyncio.to_thread(_load_saved, ingress, workflow_id, version)


@router.put("/v1/workflows/{workflow_id}", response_model=SavedWorkflow,
            openapi_extra=_json_request_body(_with_workflow(SavedWorkflowBody)))
async def update_workflow(workflow_id: str, request: Request, ingress=Depends(current_ingress)):
    current = await asyncio.to_thread(_load_saved, ingress, workflow_id)
    return await _save(ingress, workflow_id, current.version + 1,
                       _parse(SavedWorkflowBody, await _json_body(request)))


@router.delete("/v1/workflows/{workflow_id}")
async def delete_workflow(workflow_id: str, ingress=Depends(current_ingress)) -> dict:
    def delete() -> None:
        _load_saved(ingress, workflow_id)
        for version in _versions(ingress, workflow_id):
            ingress.storage.delete(f"{SAVED_PREFIX}{workflow_id}/v{version}.json")

    await asyncio.to_thread(delete)
    return {"id": workflow_id, "object": "workflow.deleted", "deleted": True}


# --- replay ----------------------------------------------------------------------------------------


def replay_payload(record: JobRecord) -> dict:
    """The job's request with every seed it used pinned, so the replay reproduces its outputs."""
    payload = json.loads(json.dumps(record.request))
    sdxl = payload.get("sdxl")
    seeds = (record.result or {}).get("seeds")
    if sdxl is not None and sdxl.get("seed") is None and seeds:
        sdxl["seed"] = seeds[0]  # image i used seed + i
    if record.kind == "workflows.run":
        payload["use_cache"] = False  # recompute, so the replay proves the bytes, not the cache
    payload["replay_of"] = record.id
    return payload


@router.post("/v1/jobs/{job_id}/replay", status_code=202)
async def replay_job(job_id: str, request: Request, ingress=Depends(current_ingress)):
    record = await asyncio.to_thread(ingress.get_job_record, job_id)
    if not record.is_terminal:
        raise ConflictError(f"job {job_id} is {record.status}; replay it once it has finished", "job_id")
    if record.kind == "images.generations" and (record.request.get("sdxl") or {}).get("seed") is None \
            and not (record.result or {}).get("seeds"):
        raise ConflictError(f"job {job_id} never recorded its seed, so a replay could not reproduce it", "job_id")
    return await ingress.submit_job(record.kind, replay_payload(record), request, list(record.stages))
