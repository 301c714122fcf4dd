"""The asset library over the derived index (storage/assets.py): search, tags and favourites,
statistics, deletes and retention runs. Every answer is the caller's tenant only (admin: all);
another tenant's job is as unknown as a missing one (404), as in api/jobs/service.py."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from api.assets.protocol import (AssetEditRequest, AssetList, AssetStats, AssetView, JobDeleted, KindStats,
                                 RetentionView, TagCount, TagList)
from api.auth import PermissionDeniedError, caller
from api.jobs.service import JobsService
from deployments.errors import ConflictError, InvalidRequestError
from storage.assets import (AssetIndex, AssetMarks, AssetMeta, AssetQuery, AssetsConfig, Retention, check_tag,
                            default_index_path, delete_job_assets, last_retention_report)
from storage.jobs import JobRecord


def _tag(value: str, param: str) -> str:
    try:
        return check_tag(value)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param) from None


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class AssetsService:
    def __init__(self, index: AssetIndex, jobs: JobsService, config: AssetsConfig):
        self.index = index
        self.jobs = jobs
        self.config = config
        self.retention = Retention(index, config.retention)

    # -- search ----------------------------------------------------------------------------

    def search(self, base_url: str, *, q: str | None = None, kind: str | None = None, model: str | None = None,
               lora: str | None = None, tag: str | None = None, favorite: bool | None = None,
               status: str | None = None, created_after: datetime | None = None,
               created_before: datetime | None = None, after: str | None = None, limit: int = 50) -> AssetList:
        if created_after is not None and created_before is not None and created_before <= created_after:
            raise InvalidRequestError("created_before must be later than created_after", "created_before")
        who = caller()
        query = AssetQuery(q=q, kind=kind, model=model, lora=lora, tag=_tag(tag, "tag") if tag is not None else None,
                           favorite=favorite, status=status, created_after=_epoch(created_after),
                           created_before=_epoch(created_before), owner=who.owner, all_owners=who.admin,
                           after=after, limit=limit + 1)
        self.index.refresh()
        rows = self.index.search(query)
        views = [self._view(JobRecord.model_validate(r["record"]), r["meta"], r["bytes"], base_url)
                 for r in rows[:limit]]
        return AssetList(data=views, has_more=len(rows) > limit, last_id=views[-1].id if views else None)

    def _view(self, record: JobRecord, meta: AssetMeta, size: int, base_url: str) -> AssetView:
        data = self.jobs.view(record, base_url).model_dump()
        for i, output in enumerate(data["outputs"]):
            output.update(meta.output(i).model_dump())
        return AssetView(**data, tags=meta.tags, favorite=meta.favorite, bytes=size)

    # -- one asset -----------------------------------------------------------------------------

    def get(self, job_id: str, base_url: str) -> AssetView:
        record = self.jobs.get(job_id)  # 404 for another tenant's
        meta, _ = self.index.meta.get(record.id)
        return self._view(record, meta, 0, base_url)

    def edit(self, job_id: str, edit: AssetEditRequest, base_url: str) -> AssetView:
        """Edit the job's marks, or output ``edit.output``'s (un-favouriting one output of a
        favourite job leaves its other outputs favourites)."""
        record = self.jobs.get(job_id)
        meta, _ = self.index.meta.get(record.id)
        if edit.output is not None and edit.output >= len(record.outputs):
            raise InvalidRequestError(f"job {record.id} has {len(record.outputs)} outputs; output is an index "
                                      "into them", "output")
        marks = meta if edit.output is None else meta.output(edit.output)
        tags = list(marks.tags) if edit.tags is None else [_tag(t, f"tags.{i}") for i, t in enumerate(edit.tags)]
        tags += [_tag(t, f"add_tags.{i}") for i, t in enumerate(edit.add_tags)]
        removed = {_tag(t, f"remove_tags.{i}") for i, t in enumerate(edit.remove_tags)}
        try:
            new = AssetMarks(tags=[t for t in tags if t not in removed],
                             favorite=marks.favorite if edit.favorite is None else edit.favorite)
        except ValidationError as exc:
            raise InvalidRequestError(f"too many tags: {exc.errors()[0]['msg']}", "tags") from None
        if edit.output is None:
            meta = AssetMeta(tags=new.tags, favorite=new.favorite, outputs=meta.outputs)
        else:
            meta = meta.with_output(edit.output, new, len(record.outputs))
        self.index.put_meta(record.id, meta)
        return self._view(record, meta, 0, base_url)

    def delete(self, job_id: str, scopes: frozenset[str] | set[str]) -> JobDeleted:
        """A finished job, its files and its tags; shared inputs stay while another job uses them."""
        record = self.jobs.get(job_id)
        self.jobs.check_scope(record, scopes, "delete")
        if not record.is_terminal:
            raise ConflictError(f"job {job_id} is {record.status}; cancel it, then delete it once it has stopped",
                                "job_id")
        report = delete_job_assets(self.index, record)
        return JobDeleted(id=record.id, files_deleted=report.deleted, files_kept=report.kept)

    async def delete_async(self, job_id: str, scopes: frozenset[str] | set[str]) -> JobDeleted:
        return await asyncio.to_thread(self.delete, job_id, scopes)

    # -- statistics and tags -------------------------------------------------------------------

    def stats(self) -> AssetStats:
        who = caller()
        self.index.refresh()
        by_kind = self.index.stats(who.owner, who.admin)
        total = {f: sum(s[f] for s in by_kind.values()) for f in ("jobs", "outputs", "bytes", "favorites")}
        return AssetStats(by_kind={k: KindStats(**v) for k, v in by_kind.items()}, total=KindStats(**total))

    def tags(self) -> TagList:
        who = caller()
        self.index.refresh()
        return TagList(data=[TagCount(tag=t, count=n) for t, n in self.index.tags(who.owner, who.admin)])

    # -- retention (every tenant's jobs: admin only) -------------------------------------------

    def _admin(self, action: str) -> None:
        if not caller().admin:
            raise PermissionDeniedError(f"to {action} the retention policy an API key needs the 'admin' scope",
                                        "dry_run")

    def retention_view(self) -> RetentionView:
        self._admin("read")
        config = self.config.retention
        last = last_retention_report(self.index.storage)
        return RetentionView(enabled=config.enabled, dry_run=config.dry_run, interval_s=config.interval_s,
                             policy={k: v.model_dump() for k, v in config.kinds.items()},
                             last_run=last.model_dump(mode="json") if last else None)

    def run_retention(self, dry_run: bool) -> dict[str, Any]:
        self._admin("apply")
        if not self.config.retention.kinds:
            raise InvalidRequestError("no retention policy is configured (ingress.assets.retention.kinds)", "dry_run")
        return self.retention.run(dry_run=dry_run).model_dump(mode="json")


def build_assets_service(storage: Any, jobs: JobsService, config: AssetsConfig) -> AssetsService:
    index = AssetIndex(storage, default_index_path(storage, config.index_dir, "ingress"), config.sync_interval_s)
    jobs.on_create.append(index.note)  # a job made here is in this replica's next search
    jobs.index = index  # GET /v1/jobs lists from it
    return AssetsService(index, jobs, config)
