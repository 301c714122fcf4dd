"""Datasets: create, list, inspect and delete; upload images; import from URLs, prefixes or jobs.

    POST   /v1/datasets                  {"name", "description"?, "trigger_word"?, "license"?} -> 201 dataset
    GET    /v1/datasets                  -> {"object": "list", "data": [dataset]}
    GET    /v1/datasets/{id}             -> dataset with versions and thumbnail URLs
    POST   /v1/datasets/{id}/images      multipart: files (images, same-stem .txt, .zip), captions? -> AddResult
    POST   /v1/datasets/{id}/imports     {"urls"|"prefix"|"job_ids"|"output_keys", ...} -> 202 job
    DELETE /v1/datasets/{id}?confirm=<name>

Storage work blocks, so it runs in a thread. Dataset errors become the API's error classes with
the offending field as ``param``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from api import current_ingress
from deployments.errors import (
    AtelierError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    parse_json,
)
from api.protocol import ErrorResponse, JobView
from storage.datasets import (
    DEFAULT_LICENSE,
    AddResult,
    DatasetBusyError,
    DatasetError,
    DatasetExistsError,
    DatasetInfo,
    DatasetNotFoundError,
    DatasetStore,
    DatasetTooLargeError,
    check_prefix_allowed,
)
from storage.fs import InvalidKeyError, validate_key
from storage.keys import OUTPUTS_PREFIX, validate_id
from storage.url_import import DatasetImportConfig, UrlRefusedError, check_url, resolve_allowed

IMPORT_JOB_KIND = "datasets.import"
THUMBNAILS = 4

router = APIRouter(prefix="/v1/datasets", tags=["datasets"],
                   responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


# --- protocol --------------------------------------------------------------------------------


class DatasetCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique; letters, digits, '_', '.', '-' (no leading dot), at most 100.")
    description: str = Field("", max_length=2000)
    trigger_word: str | None = Field(None, max_length=100, description="Token that names the subject in captions.")
    license: str = Field(DEFAULT_LICENSE, max_length=200, description="Default license of added images.")


class DatasetView(DatasetInfo):
    object: Literal["dataset"] = "dataset"
    thumbnails: list[str] = Field(default_factory=list, description="URLs of up to 4 images of the latest version.")


class DatasetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DatasetView]


class DatasetDeleted(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    deleted: bool = True


class DatasetImportRequest(BaseModel):
    """Exactly one source: ``urls``, ``prefix``, ``job_ids`` or ``output_keys``."""

    model_config = ConfigDict(extra="forbid")

    urls: list[str] | None = Field(None, description="http(s) image URLs.")
    prefix: str | None = Field(None, description="A key prefix in the storage root, or an allowed s3:// or local prefix.")
    job_ids: list[str] | None = Field(None, description="Finished jobs whose image outputs to add (captioned with their prompt).")
    output_keys: list[str] | None = Field(None, description="Storage keys of generated images, under outputs/.")
    captions: dict[str, str] = Field(default_factory=dict, description="URL or output key -> caption.")
    tags: list[str] = Field(default_factory=list, max_length=100)
    license: str | None = Field(None, max_length=200)


# --- helpers ---------------------------------------------------------------------------------


def api_error(exc: DatasetError) -> AtelierError:
    """The API error for a dataset error (also used by the import job)."""
    if isinstance(exc, DatasetNotFoundError):
        return NotFoundError(exc.message, exc.param)
    if isinstance(exc, DatasetExistsError):
        return ConflictError(exc.message, exc.param)
    if isinstance(exc, DatasetTooLargeError):
        return PayloadTooLargeError(exc.message, exc.param)
    if isinstance(exc, DatasetBusyError):
        return OverloadedError(exc.message, exc.param, retry_after=1)
    return InvalidRequestError(exc.message, exc.param)


async def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except DatasetError as exc:
        raise api_error(exc) from None


def _store(ingress) -> DatasetStore:
    """A store with the ingress's limits: an image in a zip may be as large as one uploaded on
    its own (``max_upload_bytes``), and the zips of one upload expand to at most
    ``dataset_import.max_zip_expanded_bytes`` (default 4 x ``max_upload_bytes``)."""
    config = import_config(ingress)
    upload_limit = ingress.config.max_upload_bytes
    return DatasetStore(ingress.storage, max_image_bytes=upload_limit, max_pixels=config.max_pixels,
                        max_expanded_bytes=config.max_zip_expanded_bytes or 4 * upload_limit)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def import_config(ingress) -> DatasetImportConfig:
    """The ingress's ``config.dataset_import`` (safe defaults until it has one)."""
    return DatasetImportConfig.model_validate(getattr(ingress.config, "dataset_import", None) or {})


def _view(ingress, info: DatasetInfo, request: Request, thumbnails: list[str] | None = None) -> DatasetView:
    urls = [ingress.url_for(key, request) for key in thumbnails or []]
    return DatasetView(**info.model_dump(), thumbnails=urls)


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
async def create_dataset(body: DatasetCreateRequest, request: Request, ingress=Depends(current_ingress)):
    info = await _call(_store(ingress).create, body.name, body.description, body.trigger_word, body.license)
    return _view(ingress, info, request)


@router.get("", response_model=DatasetList)
async def list_datasets(request: Request, ingress=Depends(current_ingress)):
    infos = await _call(_store(ingress).list)
    return DatasetList(data=[_view(ingress, info, request) for info in infos])


@router.get("/{dataset_id}", response_model=DatasetView)
async def get_dataset(dataset_id: str, request: Request, ingress=Depends(current_ingress)):
    store = _store(ingress)

    def load() -> tuple[DatasetInfo, list[str]]:
        info = store.get(dataset_id)
        keys = store.sample_keys(dataset_id, THUMBNAILS, info.latest_version) if info.latest_version else []
        return info, keys

    info, keys = await _call(load)
    return _view(ingress, info, request, keys)


@router.post("/{dataset_id}/images", response_model=AddResult, responses={413: {"model": ErrorResponse}})
async def upload_images(
    dataset_id: str,
    files: list[UploadFile] | None = File(None, description="Images, same-stem .txt captions, or .zip archives."),
    files_brackets: list[UploadFile] | None = File(None, alias="files[]", description="Same as files."),
    captions: str | None = Form(None, description='JSON object: file name (or stem) -> caption, e.g. {"a.png": "..."}'),
    tags: str | None = Form(None, description="JSON list or comma-separated."),
    source: str | None = Form(None, max_length=4096),
    license: str | None = Form(None, max_length=200),
    ingress=Depends(current_ingress),
):
    uploads = [*(files or []), *(files_brackets or [])]
    if not uploads:
        raise InvalidRequestError("upload at least one file as `files`", "files")
    caption_map = _json_field(captions, "captions", dict) or {}
    if not all(isinstance(v, str) for v in caption_map.values()):
        raise InvalidRequestError("captions must map file names to strings", "captions")
    tag_list = _tags(tags)
    store = _store(ingress)
    await _call(store.get, dataset_id)  # 404 before reading the body
    limit = ingress.config.max_upload_bytes
    payload, total = [], 0
    for index, upload in enumerate(uploads):
        data = await ingress.read_upload(upload, "files")
        total += len(data)
        if total > limit:
            raise PayloadTooLargeError(f"files add up to more than the limit of {limit} bytes", "files")
        payload.append((_base_name(upload.filename, index), data))
    return await _call(store.add_files, dataset_id, payload, caption_map, tags=tag_list,
                       source=source or "upload", license=license)


@router.post("/{dataset_id}/imports", status_code=202, response_model=JobView,
             responses={202: {"model": JobView, "description": "Accepted as a job; poll /v1/jobs/{id}."}})
async def import_images(dataset_id: str, body: DatasetImportRequest, request: Request,
                        ingress=Depends(current_ingress)):
    given = [name for name in ("urls", "prefix", "job_ids", "output_keys") if getattr(body, name) is not None]
    if len(given) != 1:
        raise InvalidRequestError("give exactly one of urls, prefix, job_ids or output_keys", (given or ["urls"])[-1])
    config = import_config(ingress)
    await _call(_store(ingress).get, dataset_id)
    # 1. Check inputs now, so a job never fails on a bad request
    source = given[0]
    values = getattr(body, source)
    if source != "prefix":
        if not values:
            raise InvalidRequestError(f"{source} must not be empty", source)
        if len(values) > config.max_urls:
            raise InvalidRequestError(f"{source} has {len(values)} entries, over the limit of {config.max_urls}",
                                      source)
    for index, value in enumerate(values if source != "prefix" else []):
        try:
            if source == "urls":
                _, host, port = check_url(value)
                if _is_ip_literal(host):  # no DNS here; hostnames are resolved and checked by the job
                    resolve_allowed(host, port, config.allow_private_hosts)
            elif source == "job_ids":
                validate_id(value, "job id")
            else:
                validate_key(value)
                if not value.startswith(OUTPUTS_PREFIX):
                    raise ValueError(f"key {value!r} is not under {OUTPUTS_PREFIX}")
        except (UrlRefusedError, InvalidKeyError, ValueError) as exc:
            raise InvalidRequestError(f"{source}[{index}]: {exc}", f"{source}.{index}") from None
    if source == "prefix":
        try:
            check_prefix_allowed(body.prefix, config.allowed_prefixes)
        except DatasetError as exc:
            raise api_error(exc) from None
    # 2. Record the job; the runner reads the limits from it (see graphs/dataset_jobs.py)
    payload = {"dataset_id": dataset_id, **body.model_dump(exclude_none=True),
               "config": config.model_dump(mode="json")}
    return await ingress.submit_job(IMPORT_JOB_KIND, payload, request)


@router.delete("/{dataset_id}", response_model=DatasetDeleted)
async def delete_dataset(dataset_id: str, confirm: str | None = Query(
        None, description="The dataset's name (or id), to guard against accidents."),
        ingress=Depends(current_ingress)):
    await _call(_store(ingress).delete, dataset_id, confirm)
    return DatasetDeleted(id=dataset_id)
