"""Datasets: create, list, inspect and delete; add uploaded files; check and submit imports and
captioning jobs.

Storage work blocks, so it runs in a thread. Dataset store errors become the API's error classes
with the offending field as ``param`` (graphs/dataset_jobs.py's `dataset_error`, which the
import job uses too).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from typing import Any, Callable

from pydantic import ValidationError

from api.auth import PermissionDeniedError, caller
from api.datasets.protocol import (
    DatasetCaptionRequest,
    DatasetCreateRequest,
    DatasetDeleted,
    DatasetEditRequest,
    DatasetImage,
    DatasetImageList,
    DatasetImportRequest,
    DatasetList,
    DatasetView,
)
from api.files.service import FilesService
from api.jobs.service import JobsService
from api.text.service import LLMUnavailableError
from deployments.errors import InvalidRequestError, NotFoundError
from deployments.llm.contract import GemmaLimits
from deployments.llm.vision import CaptionSettings
from graphs.dataset_jobs import dataset_error
from graphs.payloads import DatasetCaptionsPayload, DatasetImportPayload
from storage.datasets import (
    AddResult,
    DatasetError,
    DatasetInfo,
    DatasetStore,
    EditResult,
    check_prefix_allowed,
    credits_csv,
)
from storage.fs import InvalidKeyError, Storage, validate_key
from storage.jobs import JobRecord
from storage.keys import OUTPUTS_PREFIX, validate_id
from storage.url_import import DatasetImportConfig, UrlRefusedError, check_url, resolve_allowed

IMPORT_JOB_KIND = "datasets.import"
CAPTIONS_JOB_KIND = "datasets.captions"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
THUMBNAILS = 4
IMPORT_SOURCES = ("urls", "prefix", "job_ids", "output_keys")


async def _call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except DatasetError as exc:
        raise dataset_error(exc) from None


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class DatasetsService:
    def __init__(self, store: DatasetStore, jobs: JobsService, files: FilesService,
                 import_config: DatasetImportConfig, max_upload_bytes: int, llm: GemmaLimits | None = None):
        self.store = store  # holds the upload limits (see build_datasets_service)
        self.jobs = jobs
        self.files = files
        self.import_config = import_config  # copied into each import job
        self.max_upload_bytes = max_upload_bytes  # per file, and all files of one upload together
        self.llm = llm  # the language model that captions (None: no LLM deployed, no captions)

    def _view(self, info: DatasetInfo, base_url: str, thumbnails: list[str] | None = None) -> DatasetView:
        urls = [self.files.url_for(key, base_url) for key in thumbnails or []]
        return DatasetView(**info.model_dump(), thumbnails=urls)

    async def create(self, body: DatasetCreateRequest, base_url: str) -> DatasetView:
        info = await _call(self.store.create, body.name, body.description, body.trigger_word, body.license,
                           owner=caller().owner, public=body.public)
        return self._view(info, base_url)

    async def list(self, base_url: str) -> DatasetList:
        """The caller's datasets and the public ones (every dataset for admin)."""
        who = caller()
        infos = await _call(self.store.list)
        return DatasetList(data=[self._view(info, base_url) for info in infos if who.sees(info.owner, info.public)])

    async def get(self, dataset_id: str, base_url: str) -> DatasetView:
        """The dataset, with URLs of a few images of its latest version."""
        who = caller()

        def load() -> tuple[DatasetInfo, list[str]]:
            self.readable(dataset_id, who)
            info = self.store.get(dataset_id)
            keys = self.store.sample_keys(dataset_id, THUMBNAILS, info.latest_version) if info.latest_version else []
            return info, keys

        info, keys = await _call(load)
        return self._view(info, base_url, keys)

    def readable(self, dataset_id: str, who=None) -> tuple[str | None, bool]:
        """(owner, public) of a dataset the caller may read (its own, a public one, or any for admin);
        404 otherwise, as for a dataset that does not exist."""
        who = who or caller()
        try:
            owner, public = self.store.owner_of(dataset_id)
        except DatasetError:
            raise NotFoundError(f"no dataset with id {dataset_id!r}", "dataset_id") from None
        if not who.sees(owner, public):
            raise NotFoundError(f"no dataset with id {dataset_id!r}", "dataset_id")
        return owner, public

    def writable(self, dataset_id: str, who=None) -> None:
        """404 unless the caller may see the dataset; 403 if it may see but not change it (public)."""
        who = who or caller()
        owner, _ = self.readable(dataset_id, who)
        if not who.owns(owner):
            raise PermissionDeniedError(f"dataset {dataset_id} is public but not yours: only its owner changes it",
                                        "dataset_id")

    async def check_exists(self, dataset_id: str) -> None:
        """404 (or 403) now, before an upload's body is read or an import is recorded: the caller
        must own the dataset to change it."""
        await _call(self.writable, dataset_id, caller())

    async def add_files(self, dataset_id: str, files: list[tuple[str, bytes]], captions: dict[str, str],
                        tags: list[str], source: str | None, license: str | None) -> AddResult:
        """Images, same-stem .txt captions and .zip archives, added as one version."""
        await self.check_exists(dataset_id)
        return await _call(self.store.add_files, dataset_id, files, captions, tags=tags,
                           source=source or "upload", license=license)

    async def delete(self, dataset_id: str, confirm: str | None) -> DatasetDeleted:
        await self.check_exists(dataset_id)
        await _call(self.store.delete, dataset_id, confirm)
        return DatasetDeleted(id=dataset_id)

    # --- curation ---------------------------------------------------------------------------------

    def _version(self, dataset_id: str, version: int | None) -> tuple[int, int]:
        """(the version asked for, or the latest; the latest)."""
        versions = self.store.versions(dataset_id)
        latest = versions[-1] if versions else 0
        return (latest if version is None else version), latest

    async def images(self, dataset_id: str, version: int | None, offset: int, limit: int,
                     base_url: str) -> DatasetImageList:
        """A version's images (default: the latest), paged, with captions, tags and attribution."""
        who = caller()

        def load() -> DatasetImageList:
            self.readable(dataset_id, who)
            chosen, latest = self._version(dataset_id, version)
            table = self.store.manifest(dataset_id, chosen)
            rows = table.slice(offset, limit).to_pylist()
            thumbnails = self.store.thumbnail_keys(dataset_id, rows)
            data = []
            for row, thumbnail in zip(rows, thumbnails):
                url = self.files.url_for(row["key"], base_url)
                try:
                    attribution = json.loads(row["attribution"]) if row.get("attribution") else None
                except ValueError:
                    attribution = None
                data.append(DatasetImage(id=row["sha256"], key=row["key"], url=url,
                                         thumbnail_url=self.files.url_for(thumbnail, base_url),
                                         width=row["width"], height=row["height"], caption=row["caption"] or "",
                                         tags=list(row["tags"] or []), source=row["source"] or "",
                                         license=row["license"] or "", filename=row["filename"] or "",
                                         size_bytes=row["size_bytes"] or 0, attribution=attribution))
            return DatasetImageList(dataset_id=dataset_id, version=chosen, latest_version=latest,
                                    total=table.num_rows, offset=offset, limit=limit, data=data)

        return await _call(load)

    async def edit(self, dataset_id: str, body: DatasetEditRequest) -> EditResult:
        """Remove images and replace captions or tags, as a new version of the latest one."""
        await self.check_exists(dataset_id)
        return await _call(self.store.edit, dataset_id, body.version, remove=body.remove, captions=body.captions,
                           tags=body.tags)

    async def credits(self, dataset_id: str, version: int | None) -> tuple[int, str]:
        """(version, CSV of credits) for a version (default: the latest)."""
        who = caller()

        def load() -> tuple[int, str]:
            self.readable(dataset_id, who)
            chosen, _ = self._version(dataset_id, version)
            return chosen, credits_csv(self.store.manifest(dataset_id, chosen))

        return await _call(load)

    # --- imports ----------------------------------------------------------------------------------

    @staticmethod
    def import_source(body: DatasetImportRequest) -> str:
        """The import's one source: ``urls``, ``prefix``, ``job_ids`` or ``output_keys``."""
        given = [name for name in IMPORT_SOURCES if getattr(body, name) is not None]
        if len(given) != 1:
            raise InvalidRequestError("give exactly one of urls, prefix, job_ids or output_keys",
                                      (given or ["urls"])[-1])
        return given[0]

    def check_import(self, body: DatasetImportRequest, source: str) -> None:
        """Each entry of the source, checked now, so a job never fails on a bad request."""
        config = self.import_config
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
                    try:  # only the caller's own jobs (another owner's is as unknown as a missing one)
                        self.jobs.get(value)
                    except NotFoundError:
                        raise ValueError(f"no job with id {value!r}") from None
                else:
                    validate_key(value)
                    if not value.startswith(OUTPUTS_PREFIX):
                        raise ValueError(f"key {value!r} is not under {OUTPUTS_PREFIX}")
                    if not self.files.readable(value):
                        raise ValueError(f"no stored output at {value!r}")
            except (UrlRefusedError, InvalidKeyError, ValueError) as exc:
                raise InvalidRequestError(f"{source}[{index}]: {exc}", f"{source}.{index}") from None
        if source == "prefix":
            try:
                check_prefix_allowed(body.prefix, config.allowed_prefixes, storage_root=self.store.storage.root)
            except DatasetError as exc:
                raise dataset_error(exc) from None

    async def submit_import(self, dataset_id: str, body: DatasetImportRequest) -> JobRecord:
        """Check the request, then record the job; the runner reads the limits from it
        (graphs/dataset_jobs.py)."""
        source = self.import_source(body)
        await self.check_exists(dataset_id)
        await asyncio.to_thread(self.check_import, body, source)
        payload = DatasetImportPayload.create(dataset_id=dataset_id, **body.model_dump(exclude_none=True),
                                              config=self.import_config.model_dump(mode="json"))
        return await self.jobs.submit_async(payload)

    def recheck_import(self, payload: DatasetImportPayload) -> DatasetImportPayload:
        """A replayed import, checked as a new submit is, against today's import policy (allowed
        prefixes, private hosts, limits), which it then carries instead of the recorded one."""
        fields = payload.model_dump(include=set(DatasetImportRequest.model_fields), exclude_none=True)
        try:
            body = DatasetImportRequest.model_validate(fields)
        except ValidationError as exc:  # a record an older version wrote, which today's request refuses
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or "body"
            raise InvalidRequestError(f"the recorded import no longer passes: {param}: {first['msg']}", param) from None
        source = self.import_source(body)
        self.writable(payload.dataset_id)  # the caller replaying must own the dataset now
        self.check_import(body, source)
        payload.config = self.import_config.model_copy()
        return payload


    # --- captions ---------------------------------------------------------------------------------

    async def submit_captions(self, dataset_id: str, body: DatasetCaptionRequest) -> JobRecord:
        """Check the request (the dataset is the caller's: 404/403 first), pin the version, the model,
        the settings and the trigger word, then record the job (graphs/dataset_jobs.py runs it)."""
        await self.check_exists(dataset_id)
        payload = await _call(self.caption_payload, dataset_id, body)
        return await self.jobs.submit_async(payload)

    def caption_payload(self, dataset_id: str, body: DatasetCaptionRequest) -> DatasetCaptionsPayload:
        if self.llm is None:
            raise LLMUnavailableError("captions need the language model, and this application deploys none",
                                      "model")
        info = self.store.get(dataset_id)
        if not info.latest_version:
            raise InvalidRequestError(f"dataset {dataset_id} has no images to caption yet", "version")
        version = body.version if body.version is not None else info.latest_version
        if version > info.latest_version:
            raise InvalidRequestError(f"dataset {dataset_id} has no version {version} (the latest is "
                                      f"{info.latest_version})", "version")
        if body.trigger_word is None:
            trigger = info.trigger_word
        elif _CONTROL.search(body.trigger_word):
            raise InvalidRequestError("trigger_word must be text on one line", "trigger_word")
        else:
            trigger = body.trigger_word.strip() or None  # "" (or blank): no trigger word
        settings = CaptionSettings(style=body.style, instruction=body.instruction)
        return DatasetCaptionsPayload.create(dataset_id=dataset_id, version=version, overwrite=body.overwrite,
                                             trigger_word=trigger, model=self.llm.model, settings=settings,
                                             max_images=body.max_images)

    def recheck_captions(self, payload: DatasetCaptionsPayload) -> DatasetCaptionsPayload:
        """A replayed captioning job: the caller must own the dataset now, and the model is today's."""
        self.writable(payload.dataset_id)
        if self.llm is None:
            raise LLMUnavailableError("captions need the language model, and this application deploys none",
                                      "model")
        versions = self.store.versions(payload.dataset_id)
        if payload.version not in versions:
            raise InvalidRequestError(f"dataset {payload.dataset_id} has no version {payload.version} now", "version")
        payload.model = self.llm.model
        return payload


def build_datasets_service(storage: Storage, jobs: JobsService, files: FilesService,
                           import_config: DatasetImportConfig, max_upload_bytes: int,
                           llm: GemmaLimits | None = None) -> DatasetsService:
    """A store with the ingress's limits: an image in a zip may be as large as one uploaded on its
    own (``max_upload_bytes``), and the zips of one upload expand to at most
    ``import_config.max_zip_expanded_bytes`` (default 4 x ``max_upload_bytes``)."""
    store = DatasetStore(storage, max_image_bytes=max_upload_bytes, max_pixels=import_config.max_pixels,
                         max_expanded_bytes=import_config.max_zip_expanded_bytes or 4 * max_upload_bytes)
    service = DatasetsService(store, jobs, files, import_config, max_upload_bytes, llm)
    jobs.replay_checks[IMPORT_JOB_KIND] = service.recheck_import  # a replay meets today's import policy
    jobs.replay_checks[CAPTIONS_JOB_KIND] = service.recheck_captions
    return service
