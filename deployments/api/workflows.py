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
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from deployments.api import current_ingress
from deployments.errors import AtelierError, ConflictError, InvalidRequestError, NotFoundError
from deployments.media import check_size, parse_size
from deployments.runtime import random_seed
from graphs.workflows import NODE_TYPES, ValidationReport, Workflow, WorkflowIssue, validate_workflow, workflow_schema
from storage.datasets import _put_if_absent
from storage.fs import ObjectNotFoundError
from storage.jobs import JobRecord
from storage.keys import new_id

router = APIRouter(tags=["workflows"])

SAVED_PREFIX = "workflows/saved/"
SDXL_NODE_TYPES = ("text_to_image", "image_to_image", "inpaint")


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
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}", "body") from None


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


async def check_workflow(ingress, doc: Any) -> tuple[ValidationReport, Workflow | None]:
    """Structural checks, then the models' limits, styles and LoRAs; every problem is reported."""
    sdxl = await ingress.sdxl_info()
    limits = {t: {"max_steps": sdxl["max_steps"]} for t in SDXL_NODE_TYPES}
    report = validate_workflow(doc, available_deployments=set(ingress.handles),
                               limits=limits, max_nodes=ingress.config.max_workflow_nodes)
    if not report.valid:
        return report, None
    workflow = Workflow.model_validate(doc)
    issues: list[WorkflowIssue] = []
    for node in workflow.nodes:
        params = node.params
        if node.type in SDXL_NODE_TYPES and params.get("size"):
            try:
                width, height = parse_size(params["size"])
                check_size(width, height, min_size=sdxl["min_size"], max_size=sdxl["max_size"])
            except AtelierError as exc:
                issues.append(WorkflowIssue(node=node.id, field="params.size", message=exc.message))
        if params.get("style") and params["style"] not in sdxl["styles"]:
            issues.append(WorkflowIssue(node=node.id, field="params.style",
                                        message=f"unknown style {params['style']!r}; known: {sorted(sdxl['styles'])}"))
        if params.get("lora"):
            try:
                await ingress.lora_record(params["lora"])
            except AtelierError as exc:
                issues.append(WorkflowIssue(node=node.id, field="params.lora", message=exc.message))
    if issues:
        return ValidationReport(valid=False, errors=issues, order=report.order), None
    return report, workflow


async def _run_payload(ingress, workflow: Workflow, use_cache: bool, saved: dict | None) -> dict:
    """Seeds pinned (a run and its replay are reproducible), LoRAs pinned to a version, and
    what each refine node needs to talk to the LLM."""
    nodes = []
    refine: dict[str, dict] = {}
    for node in workflow.nodes:
        params = dict(node.params)
        if "seed" in NODE_TYPES[node.type].params.model_fields and params.get("seed") is None:
            params["seed"] = random_seed()
        if params.get("lora"):
            params["lora"] = (await ingress.lora_record(params["lora"])).id
        if node.type == "refine":
            style = await ingress.style_preset(params.get("style"))
            refine[node.id] = {
                "model": ingress.llm_info["model"], "settings": ingress.llm_settings.model_dump(),
                "style": style.model_dump() if style else None,
                "trigger_word": await ingress.lora_trigger_word(params.get("lora")),
            }
        nodes.append({**node.model_dump(), "params": params})
    return {"workflow": {**workflow.model_dump(), "nodes": nodes}, "use_cache": use_cache, "refine": refine,
            "saved": saved}


# --- routes --------------------------------------------------------------------------------------


@router.get("/v1/workflows/schema")
async def get_schema() -> dict:
    return workflow_schema()


@router.post("/v1/workflows/validate", response_model=ValidationReport)
async def validate(request: Request, ingress=Depends(current_ingress)) -> ValidationReport:
    """200 with `valid`, every problem (node id, field, message) and the execution order."""
    report, _ = await check_workflow(ingress, await _json_body(request))
    return report


@router.post("/v1/workflows/runs", status_code=202)
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
    if not await asyncio.to_thread(_put_if_absent, ingress.storage, key, data, "application/json"):
        raise ConflictError(f"workflow {workflow_id} version {version} was saved meanwhile; retry", "workflow_id")
    return saved


@router.post("/v1/workflows", status_code=201, response_model=SavedWorkflow)
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


@router.put("/v1/workflows/{workflow_id}", response_model=SavedWorkflow)
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
