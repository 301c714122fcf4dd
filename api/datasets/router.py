"""Datasets: create, list, inspect and delete; upload images; import from URLs, prefixes or jobs.

    POST   /v1/datasets                  {"name", "description"?, "trigger_word"?, "license"?} -> 201 dataset
    GET    /v1/datasets                  -> {"object": "list", "data": [dataset]}
    GET    /v1/datasets/{id}             -> dataset with versions and thumbnail URLs
    POST   /v1/datasets/{id}/images      multipart: files (images, same-stem .txt, .zip), captions? -> AddResult
    POST   /v1/datasets/{id}/imports     {"urls"|"prefix"|"job_ids"|"output_keys", ...} -> 202 job
    DELETE /v1/datasets/{id}?confirm=<name>
    GET    /v1/datasets/{id}/images?version=&offset=&limit=   a version's images, paged, with attribution
    POST   /v1/datasets/{id}/edits       {"version", "remove"?, "captions"?, "tags"?} -> a new version (409 if stale)
    GET    /v1/datasets/{id}/credits?version=                 text/csv: who made each image, and its licence
    POST   /v1/datasets/{id}/captions    {"version"?, "overwrite"?, "trigger_word"?, "style"?, "instruction"?,
                                          "max_images"?} -> 202 job: the LLM captions the images into a new version

The work is DatasetsService's (api/datasets/service.py); this module parses and answers.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile

from api.datasets.protocol import (
    DatasetCaptionRequest,
    DatasetCreateRequest,
    DatasetDeleted,
    DatasetEditRequest,
    DatasetImageList,
    DatasetImportRequest,
    DatasetList,
    DatasetView,
)
from api.datasets.service import DatasetsService
from api.errors_protocol import ErrorResponse
from api.jobs.protocol import JobView
from api.jobs.router import accepted, base_url, jobs_service
from api.jobs.service import JobsService
from api.uploads import Uploads
from deployments.errors import InvalidRequestError, PayloadTooLargeError, parse_json
from storage.datasets import AddResult, EditResult

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def datasets_service(request: Request) -> DatasetsService:
    return request.app.state.datasets


def uploads(request: Request) -> Uploads:
    return request.app.state.uploads


# --- form fields -----------------------------------------------------------------------------


def _json_field(value: str | None, param: str, kind: type) -> Any:
    if value is None or value == "":
        return None
    parsed = parse_json(value, param)
    if not isinstance(parsed, kind):
        raise InvalidRequestError(f"{param} must be a JSON {kind.__name__}", param)
    return parsed


def _tags(value: str | None) -> list[str]:
    if value is None or not value.strip():
        return []
    if value.lstrip().startswith("["):
        tags = _json_field(value, "tags", list)
        if not all(isinstance(t, str) for t in tags):
            raise InvalidRequestError("tags must be a JSON list of strings", "tags")
        return tags
    return [t.strip() for t in value.split(",") if t.strip()]


def _base_name(filename: str | None, index: int) -> str:
    # the client's name is only a label; directories in it mean nothing here
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return name or f"file{index}"


# --- routes ----------------------------------------------------------------------------------


@router.post("", status_code=201, response_model=DatasetView, responses={409: {"model": ErrorResponse}})
async def create_dataset(body: DatasetCreateRequest, request: Request,
                         datasets: DatasetsService = Depends(datasets_service)) -> DatasetView:
    return await datasets.create(body, base_url(request))


@router.get("", response_model=DatasetList)
async def list_datasets(request: Request, datasets: DatasetsService = Depends(datasets_service)) -> DatasetList:
    return await datasets.list(base_url(request))


@router.get("/{dataset_id}", response_model=DatasetView)
async def get_dataset(dataset_id: str, request: Request,
                      datasets: DatasetsService = Depends(datasets_service)) -> DatasetView:
    return await datasets.get(dataset_id, base_url(request))


@router.post("/{dataset_id}/images", response_model=AddResult, responses={413: {"model": ErrorResponse}})
async def upload_images(
    dataset_id: str,
    files: list[UploadFile] | None = File(None, description="Images, same-stem .txt captions, or .zip archives."),
    files_brackets: list[UploadFile] | None = File(None, alias="files[]", description="Same as files."),
    captions: str | None = Form(None, description='JSON object: file name (or stem) -> caption, e.g. {"a.png": "..."}'),
    tags: str | None = Form(None, description="JSON list or comma-separated."),
    source: str | None = Form(None, max_length=4096),
    license: str | None = Form(None, max_length=200),
    datasets: DatasetsService = Depends(datasets_service),
    reader: Uploads = Depends(uploads),
) -> AddResult:
    given = [*(files or []), *(files_brackets or [])]
    if not given:
        raise InvalidRequestError("upload at least one file as `files`", "files")
    caption_map = _json_field(captions, "captions", dict) or {}
    if not all(isinstance(v, str) for v in caption_map.values()):
        raise InvalidRequestError("captions must map file names to strings", "captions")
    tag_list = _tags(tags)
    await datasets.check_exists(dataset_id)  # 404 before reading the body
    limit = datasets.max_upload_bytes
    payload, total = [], 0
    for index, upload in enumerate(given):
        data = await reader.read(upload, "files")
        total += len(data)
        if total > limit:
            raise PayloadTooLargeError(f"files add up to more than the limit of {limit} bytes", "files")
        payload.append((_base_name(upload.filename, index), data))
    return await datasets.add_files(dataset_id, payload, caption_map, tag_list, source, license)


@router.post("/{dataset_id}/imports", status_code=202, response_model=JobView,
             responses={202: {"model": JobView, "description": "Accepted as a job; poll /v1/jobs/{id}."}})
async def import_images(dataset_id: str, body: DatasetImportRequest, request: Request,
                        datasets: DatasetsService = Depends(datasets_service),
                        jobs: JobsService = Depends(jobs_service)):
    return accepted(jobs, await datasets.submit_import(dataset_id, body), request)


@router.post("/{dataset_id}/captions", status_code=202, response_model=JobView,
             responses={202: {"model": JobView, "description": "Accepted as a job; poll /v1/jobs/{id}. Its result: "
                                                               "the new version and the counts captioned, kept, "
                                                               "skipped, failed."}})
async def caption_images(dataset_id: str, body: DatasetCaptionRequest, request: Request,
                         datasets: DatasetsService = Depends(datasets_service),
                         jobs: JobsService = Depends(jobs_service)):
    return accepted(jobs, await datasets.submit_captions(dataset_id, body), request)


@router.get("/{dataset_id}/images", response_model=DatasetImageList)
async def list_images(dataset_id: str, request: Request,
                      version: int | None = Query(None, ge=0, description="Default: the latest."),
                      offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500),
                      datasets: DatasetsService = Depends(datasets_service)) -> DatasetImageList:
    return await datasets.images(dataset_id, version, offset, limit, base_url(request))


@router.post("/{dataset_id}/edits", response_model=EditResult, responses={409: {"model": ErrorResponse}})
async def edit_images(dataset_id: str, body: DatasetEditRequest,
                      datasets: DatasetsService = Depends(datasets_service)) -> EditResult:
    return await datasets.edit(dataset_id, body)


@router.get("/{dataset_id}/credits", response_class=Response,
            responses={200: {"content": {"text/csv": {}}, "description": "One row per image."}})
async def credits(dataset_id: str, version: int | None = Query(None, ge=0, description="Default: the latest."),
                  datasets: DatasetsService = Depends(datasets_service)) -> Response:
    chosen, text = await datasets.credits(dataset_id, version)
    return Response(text, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="{dataset_id}-v{chosen}-credits.csv"'})


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
async def delete_dataset(dataset_id: str, confirm: str | None = Query(
        None, description="The dataset's name (or id), to guard against accidents."),
        datasets: DatasetsService = Depends(datasets_service)) -> DatasetDeleted:
    return await datasets.delete(dataset_id, confirm)
