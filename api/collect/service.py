"""Collect: list the image sources, search them, and import chosen results into a dataset.

Searching calls each source's API from the ingress with the key from this process's environment
(storage/sources.py) and remembers every result it returns, per owner. An import takes only
remembered result ids: the job downloads what the source said (its download URL, on the source's
download hosts) through the safe URL importer and records the source's attribution.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

from api.auth import caller
from api.collect.protocol import (
    CollectImportRequest,
    CollectSearchRequest,
    CollectSearchResponse,
    SourceFailure,
    SourceList,
    SourcePageInfo,
)
from api.datasets.service import DatasetsService
from api.jobs.service import JobsService
from deployments.errors import AtelierError, InvalidRequestError
from graphs.payloads import DatasetCollectPayload
from storage.datasets import MAX_TAG_LENGTH, MAX_TAGS
from storage.fs import Storage
from storage.jobs import JobRecord
from storage.sources import (
    SOURCE_NAMES,
    CollectConfig,
    CollectRecords,
    SearchPage,
    Source,
    SourceError,
    SourceRateLimitedError,
    build_sources,
)
from storage.url_import import DatasetImportConfig

COLLECT_JOB_KIND = "datasets.collect"


class SourceRateLimitError(AtelierError):
    """A source answered 429: its message says when the source's window resets."""

    status_code = 429
    error_type = "source_rate_limited"


class SourceFailedError(AtelierError):
    """A source refused the configured key, failed or answered in an unexpected shape."""

    status_code = 502
    error_type = "upstream_error"


def source_error(exc: SourceError) -> AtelierError:
    if isinstance(exc, SourceRateLimitedError):
        wait = max(1, int((exc.reset_at or time.time() + 60) - time.time()))
        return SourceRateLimitError(exc.message, exc.param, headers={"Retry-After": str(wait)})
    if exc.status < 500:
        return InvalidRequestError(exc.message, exc.param)
    return SourceFailedError(exc.message, exc.param)


class CollectService:
    def __init__(self, config: CollectConfig, sources: dict[str, Source], records: CollectRecords,
                 datasets: DatasetsService, jobs: JobsService, import_config: DatasetImportConfig):
        self.config = config
        self.sources = sources
        self.records = records
        self.datasets = datasets
        self.jobs = jobs
        self.import_config = import_config

    def list_sources(self) -> SourceList:
        return SourceList(data=[self.sources[name].status() for name in SOURCE_NAMES])

    def rate_limit_headers(self, names: Iterable[str]) -> dict[str, str]:
        """``X-RateLimit-<Source>-Limit``/``-Remaining``/``-Reset`` (Unix seconds): what each named
        source's last answer said, as far as it said it."""
        headers = {}
        for name in names:
            last = self.sources[name].rate.last
            for field, value in (("Limit", last.limit), ("Remaining", last.remaining), ("Reset", last.reset_at)):
                if value is not None:
                    headers[f"X-RateLimit-{name.capitalize()}-{field}"] = str(int(value))
        return headers

    def _chosen(self, names: list[str] | None) -> list[Source]:
        if names is None:
            chosen = [s for s in self.sources.values() if s.status().available]
            if not chosen:
                reasons = "; ".join(f"{s.name}: {s.status().reason}" for s in self.sources.values())
                raise InvalidRequestError(f"no source is available ({reasons})", "sources")
            return chosen
        if not names:
            raise InvalidRequestError("sources must name at least one source (or be left out)", "sources")
        chosen = []
        for index, name in enumerate(dict.fromkeys(names)):
            if name not in self.sources:
                raise InvalidRequestError(f"unknown source {name!r}; known: {list(SOURCE_NAMES)}", f"sources.{index}")
            status = self.sources[name].status()
            if not status.available:
                raise InvalidRequestError(f"source {name} is unavailable: {status.reason}", f"sources.{index}")
            chosen.append(self.sources[name])
        return chosen

    async def search(self, body: CollectSearchRequest) -> CollectSearchResponse:
        """Each chosen source's page of results, normalised, remembered for the caller's imports.
        Bad input is a 400 before any source is called; if every source fails, its error is the
        answer (429 with the reset time for a rate limit), otherwise failures are listed. A source
        whose remembered rate limit is spent is not called until it resets (its 429 as if it had
        answered); see :meth:`rate_limit_headers`."""
        who = caller()
        query = body.query.strip()
        if not query:
            raise InvalidRequestError("query must not be empty", "query")
        chosen = self._chosen(body.sources)
        for source in chosen:
            try:
                source.check_search(query, body.page, body.per_page, body.orientation, body.color)
            except SourceError as exc:
                raise source_error(exc) from None

        def one(source: Source) -> SearchPage | SourceError:
            try:
                return source.search(query, body.page, body.per_page, body.orientation, body.color)
            except SourceError as exc:
                return exc

        answers = await asyncio.gather(*(asyncio.to_thread(one, source) for source in chosen))
        pages = [a for a in answers if isinstance(a, SearchPage)]
        failures = [a for a in answers if isinstance(a, SourceError)]
        if not pages:
            error = source_error(failures[0])
            error.headers.update(self.rate_limit_headers(source.name for source in chosen))
            raise error
        results = [result for page in pages for result in page.results]
        await asyncio.to_thread(self.records.remember, who.owner, results)
        errors = [SourceFailure(source=source.name, type=type(a).__name__, message=a.message,
                                reset_at=getattr(a, "reset_at", None))
                  for source, a in zip(chosen, answers) if isinstance(a, SourceError)]
        return CollectSearchResponse(
            query=query, page=body.page, per_page=body.per_page, data=results, errors=errors,
            sources={p.source: SourcePageInfo(total=p.total, total_pages=p.total_pages, results=len(p.results),
                                              rate_limit=p.rate_limit) for p in pages})

    def _payload(self, dataset_id: str, body: CollectImportRequest, owner: str | None) -> DatasetCollectPayload:
        ids = list(dict.fromkeys(body.result_ids))
        if not ids:
            raise InvalidRequestError("result_ids must name at least one search result", "result_ids")
        if len(ids) > self.config.max_import:
            raise InvalidRequestError(f"result_ids has {len(ids)} entries, over the limit of {self.config.max_import}",
                                      "result_ids")
        if len(body.tags) > MAX_TAGS or any(not t.strip() or len(t) > MAX_TAG_LENGTH for t in body.tags):
            raise InvalidRequestError(f"tags must be at most {MAX_TAGS} non-blank strings of at most "
                                      f"{MAX_TAG_LENGTH} characters", "tags")
        items = []
        for index, result_id in enumerate(ids):
            result = self.records.recall(owner, result_id)
            if result is None:
                raise InvalidRequestError(
                    f"result_ids[{index}]: {result_id!r} was not returned by a search on this server (or more than "
                    f"{int(self.config.result_ttl_s)} s ago); search again and import what it returns",
                    f"result_ids.{index}")
            source = self.sources.get(result.source)
            if source is None or not source.config.enabled:
                raise InvalidRequestError(f"result_ids[{index}]: source {result.source} is disabled now",
                                          f"result_ids.{index}")
            items.append(result)
        used = {item.source for item in items}
        return DatasetCollectPayload.create(
            dataset_id=dataset_id, items=items, tags=[t.strip() for t in body.tags],
            sources={name: self.sources[name].config for name in sorted(used)}, app_name=self.config.app_name,
            config=self.import_config)

    async def submit(self, dataset_id: str, body: CollectImportRequest) -> JobRecord:
        """Check the dataset (404/403 first), then every id against what searches returned to the
        caller, then record the job."""
        who = caller()
        await self.datasets.check_exists(dataset_id)
        payload = await asyncio.to_thread(self._payload, dataset_id, body, who.owner)
        return await self.jobs.submit_async(payload)

    def recheck_replay(self, payload: DatasetCollectPayload) -> DatasetCollectPayload:
        """A replayed collect runs with today's download hosts, importer limits and allow-list."""
        self.datasets.writable(payload.dataset_id)
        for item in payload.items:
            source = self.sources.get(item.source)
            if source is None or not source.config.enabled:
                raise InvalidRequestError(f"source {item.source} is disabled now", "result_ids")
        payload.sources = {name: self.sources[name].config for name in payload.sources if name in self.sources}
        payload.config = self.import_config.model_copy()
        return payload


def build_collect_service(storage: Storage, config: CollectConfig, datasets: DatasetsService, jobs: JobsService,
                          import_config: DatasetImportConfig, transport: Any = None) -> CollectService:
    service = CollectService(config, build_sources(config, transport), CollectRecords(storage, config.result_ttl_s),
                             datasets, jobs, import_config)
    jobs.replay_checks[COLLECT_JOB_KIND] = service.recheck_replay
    return service
