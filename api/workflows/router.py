"""User workflows (node graphs over the deployments) and saved workflows.

    GET    /v1/workflows/schema        the workflow JSON Schema and the node type catalogue
    GET    /v1/workflows/templates     starting workflows for the editor (api/workflows/templates.py)
    POST   /v1/workflows/validate      every problem with its node id and field, and the execution order
    POST   /v1/workflows/runs          run a workflow (inline, or a saved one by id and version) as one job: 202
    POST   /v1/workflows               save a workflow: id, version 1
    GET    /v1/workflows               saved workflows (latest versions)
    GET    /v1/workflows/{id}          a saved workflow (`?version=N`; default the latest)
    PUT    /v1/workflows/{id}          a new version
    DELETE /v1/workflows/{id}          every version

The work is WorkflowsService's (api/workflows/service.py); this module parses and answers. The
workflow routes parse their JSON body themselves, so that a bad workflow lists every problem at
once; a refused workflow answers 400 with all of them (`errors`).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from api.jobs.router import accepted, jobs_service
from api.jobs.service import JobsService
from api.security import JSON, require_media_type
from api.workflows.protocol import SavedWorkflow, SavedWorkflowBody, WorkflowRunRequest
from api.workflows.service import InvalidWorkflowError, WorkflowsService
from api.workflows.templates import list_templates
from deployments.errors import InvalidRequestError, parse_json
from graphs.workflows import ValidationReport, Workflow, workflow_schema

router = APIRouter(tags=["workflows"])


def workflows_service(request: Request) -> WorkflowsService:
    return request.app.state.workflows


# --- request bodies and errors -----------------------------------------------------------------


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


def _with_workflow(model: type[BaseModel]) -> dict[str, Any]:
    schema = _inlined_schema(model)
    schema["properties"]["workflow"] = {**schema["properties"]["workflow"], **_inlined_schema(Workflow)}
    schema["properties"]["workflow"].pop("anyOf", None)
    return schema


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if raw:  # JSON only: a text/plain body (which a browser sends cross-site without asking) is never parsed
        require_media_type(request.headers.get("content-type"), (JSON,))
    return parse_json(raw, "body")


def _parse(model: type[BaseModel], body: Any) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{field}: {first['msg']}", field) from None


def invalid_workflow(exc: InvalidWorkflowError) -> JSONResponse:
    """400 listing every problem; `param` names the first one's node and field."""
    body = {"error": {"type": exc.error_type, "param": exc.param, "message": exc.message,
                      "errors": [e.model_dump() for e in exc.report.errors]}}
    return JSONResponse(body, status_code=400)


# --- workflows -----------------------------------------------------------------------------------


@router.get("/v1/workflows/schema")
async def get_schema() -> dict:
    return workflow_schema()


@router.get("/v1/workflows/templates")
async def get_templates(workflows: WorkflowsService = Depends(workflows_service)) -> dict:
    """Starting workflows for the editor, each with the deployments it needs and whether they are deployed."""
    return {"object": "list", "data": list_templates(set(workflows.models.handles))}


@router.post("/v1/workflows/validate", response_model=ValidationReport,
             openapi_extra=_json_request_body(_inlined_schema(Workflow)))
async def validate(request: Request, workflows: WorkflowsService = Depends(workflows_service)) -> ValidationReport:
    """200 with `valid`, every problem (node id, field, message) and the execution order."""
    report, _ = await workflows.check(await _json_body(request))
    return report


@router.post("/v1/workflows/runs", status_code=202, openapi_extra=_json_request_body(_with_workflow(WorkflowRunRequest)))
async def run(request: Request, workflows: WorkflowsService = Depends(workflows_service),
              jobs: JobsService = Depends(jobs_service)):
    body = _parse(WorkflowRunRequest, await _json_body(request))
    try:
        record = await workflows.run(body)
    except InvalidWorkflowError as exc:
        return invalid_workflow(exc)
    return accepted(jobs, record, request)


# --- saved workflows -----------------------------------------------------------------------------


@router.post("/v1/workflows", status_code=201, response_model=SavedWorkflow,
             openapi_extra=_json_request_body(_with_workflow(SavedWorkflowBody)))
async def create_workflow(request: Request, workflows: WorkflowsService = Depends(workflows_service)):
    body = _parse(SavedWorkflowBody, await _json_body(request))
    try:
        return await workflows.create(body)
    except InvalidWorkflowError as exc:
        return invalid_workflow(exc)


@router.get("/v1/workflows")
async def list_workflows(limit: int = Query(50, ge=1, le=200),
                         workflows: WorkflowsService = Depends(workflows_service)) -> dict:
    return {"object": "list", "data": [saved.model_dump() for saved in await workflows.list(limit)]}


@router.get("/v1/workflows/{workflow_id}", response_model=SavedWorkflow)
async def get_workflow(workflow_id: str, version: int | None = Query(None, ge=1),
                       workflows: WorkflowsService = Depends(workflows_service)) -> SavedWorkflow:
    return await workflows.get(workflow_id, version)


@router.put("/v1/workflows/{workflow_id}", response_model=SavedWorkflow,
            openapi_extra=_json_request_body(_with_workflow(SavedWorkflowBody)))
async def update_workflow(workflow_id: str, request: Request, workflows: WorkflowsService = Depends(workflows_service)):
    current = await workflows.get(workflow_id)  # 404 before the body is read
    body = _parse(SavedWorkflowBody, await _json_body(request))
    try:
        return await workflows.save(workflow_id, current.version + 1, body)
    except InvalidWorkflowError as exc:
        return invalid_workflow(exc)


@router.delete("/v1/workflows/{workflow_id}")
async def delete_workflow(workflow_id: str, workflows: WorkflowsService = Depends(workflows_service)) -> dict:
    await workflows.delete(workflow_id)
    return {"id": workflow_id, "object": "workflow.deleted", "deleted": True}
