"""The asset library: a search index over job records, tags and favourites, deletes, retention.

Design (several ingress replicas on several nodes share one storage; none shares a disk):

* **The records stay the truth.** Job records are one JSON per job under ``jobs/``
  (:mod:`storage.jobs`). The index is *derived*: every process keeps its own SQLite database
  (stdlib ``sqlite3`` with FTS5) on its local disk, and can throw it away and rebuild it.
* **Sync.** :meth:`AssetIndex.sync` lists the job ids (one ``list`` of ``jobs/``, no record
  reads) and diffs them against the ids it holds: ids it has not seen are read and indexed
  (whatever their time order: a replica whose clock is behind cannot slip a record under a
  watermark), ids gone from storage are dropped (a delete on another replica), and records it
  holds as unfinished are read again until they are terminal. This full sync runs on a
  background thread every ``sync_interval_s`` (never in a search's path: at 100,000 records the
  listing alone is a few hundred ms). A search runs a quick sync first: the unfinished jobs (new
  ids from the small ``jobs/active/`` marker folder and the jobs this replica just made, and those
  it holds as unfinished, read again), so a job seen running is seen finishing at once. What can
  be up to ``sync_interval_s`` late: a job made *and* finished on another replica between two
  searches here, a tag or a delete made on another replica. This replica's own edits, deletes
  and new jobs reach its index at once. The job listing (GET /v1/jobs) answers from the index
  too, once it is built (api/jobs/service.py).
* **User edits are small shared records.** Tags and the favourite flag of a job, and of each of
  its outputs by output index (:class:`AssetMeta`), live in
  ``assets/meta/<job id>.<version id>.json`` (version ids are :func:`storage.keys.new_id`, so
  time-ordered). A write puts a new version, then deletes the older ones; the newest version is
  the state (last writer wins, as for :meth:`JobStore.update`). The sync lists ``assets/meta/``
  (one ``list``, as many entries as edited jobs) and re-reads only a job whose newest version id
  is not the one it indexed, so an edit on any replica reaches every index.
* **Deletes** remove the job's outputs and stage intermediates, its meta and its record. A
  shared input stays while anything uses it: an output another job's request names is kept (it
  becomes an orphan of the deleted job); an input of the deleted job (an upload, or such an
  orphaned output) is deleted only when no other job names it. "Names it" is answered from the
  index's ``inputs`` table (request inputs never change after a job is made) after
  :meth:`AssetIndex.catch_up`: the quick sync, plus the jobs made since the last full sync began
  (less an hour of clock skew), listed by their id prefixes, so no delete lists every job id. Only
  the deleted job leaves the index.
* **Retention** (:class:`RetentionConfig`, per job kind): a sweeper on the job runners' reaper
  timer (graphs/job_runner.py) plans from the index (terminal jobs of a kind older than
  ``max_age_days``; a job that is, or has an output that is, a favourite is kept unless told
  otherwise), re-reads each candidate's record and meta before deleting it, and writes its
  report to ``assets/retention/last.json``. With
  ``dry_run`` (the default) it only reports what would go. One runner sweeps per period: it
  takes the period's lease with :meth:`Storage.put_if_absent`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator

from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage
from storage.jobs import TERMINAL_STATUSES, JobNotFoundError, JobRecord, JobStore
from storage.keys import JOBS_PREFIX, OUTPUTS_PREFIX, new_id, output_owner, validate_id

__all__ = [
    "ASSET_META_PREFIX",
    "RETENTION_REPORT_KEY",
    "AssetMarks",
    "AssetMeta",
    "AssetMetaStore",
    "AssetIndex",
    "AssetQuery",
    "AssetsConfig",
    "DeleteReport",
    "RetentionRule",
    "RetentionConfig",
    "RetentionReport",
    "Retention",
    "asset_fields",
    "check_tag",
    "delete_job_assets",
]

log = logging.getLogger(__name__)

ASSET_META_PREFIX = "assets/meta/"
RETENTION_REPORT_KEY = "assets/retention/last.json"
SWEEP_LEASE_PREFIX = "assets/sweeps/"
UPLOADS_PREFIX = "uploads/"
# How far replicas' clocks may disagree: a job's id time is at most this far from when it was made.
CLOCK_SKEW_S = 3600.0

MAX_TAGS = 20
MAX_TAG_LENGTH = 40
_TAG_RE = re.compile(r"[a-z0-9][a-z0-9 _.:\-]*")


def check_tag(tag: object) -> str:
    """A tag as stored: trimmed and lower-cased, 1-40 of letters, digits, space, ``_.:-``."""
    if not isinstance(tag, str):
        raise ValueError(f"a tag must be a string, got {type(tag).__name__}")
    value = " ".join(tag.split()).lower()
    if not value or len(value) > MAX_TAG_LENGTH or not _TAG_RE.fullmatch(value):
        raise ValueError(f"tag {tag!r} must be 1-{MAX_TAG_LENGTH} letters, digits, spaces or '_.:-', "
                         "starting with a letter or digit")
    return value


# --- tags and favourites: the shared records ---------------------------------------------------


class AssetMarks(BaseModel):
    """Tags and the favourite flag of a job, or of one of its outputs."""

    model_config = ConfigDict(extra="ignore")

    tags: list[str] = Field(default_factory=list)
    favorite: bool = False

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: list[str]) -> list[str]:
        out = list(dict.fromkeys(check_tag(t) for t in tags))
        if len(out) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags")
        return out


class AssetMeta(AssetMarks):
    """A job's marks, and its outputs' by output index (their place in ``JobRecord.outputs``). A
    favourite job counts as every output a favourite; in the index a job is a favourite when it or
    any output is one, and it has the tags of all of them."""

    outputs: dict[NonNegativeInt, AssetMarks] = Field(default_factory=dict)
    updated_at: float = 0.0

    @property
    def any_favorite(self) -> bool:
        return self.favorite or any(m.favorite for m in self.outputs.values())

    @property
    def all_tags(self) -> list[str]:
        return list(dict.fromkeys([*self.tags, *(t for m in self.outputs.values() for t in m.tags)]))

    def output(self, index: int) -> AssetMarks:
        """Output ``index`` as shown: its own tags, a favourite when it or its job is one."""
        own = self.outputs.get(index) or AssetMarks()
        return AssetMarks(tags=own.tags, favorite=self.favorite or own.favorite)

    def with_output(self, index: int, marks: AssetMarks, count: int) -> AssetMeta:
        """This meta with output ``index`` (of ``count``) shown as ``marks`` (see :meth:`output`).
        Un-favouriting one output of a favourite job leaves the job's other outputs favourites."""
        outputs = dict(self.outputs)
        favorite = self.favorite
        if favorite and not marks.favorite:
            favorite = False
            for i in range(count):
                outputs[i] = (outputs.get(i) or AssetMarks()).model_copy(update={"favorite": True})
        outputs[index] = marks.model_copy(update={"favorite": marks.favorite and not favorite})
        return AssetMeta(tags=self.tags, favorite=favorite,
                         outputs={i: m for i, m in sorted(outputs.items()) if m.tags or m.favorite})


class AssetMetaStore:
    """``assets/meta/<job id>.<version id>.json`` (one flat folder: one ``list`` shows every edited
    job's versions): the newest version is a job's tags and favourite."""

    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def _prefix(job_id: str) -> str:
        job_id = validate_id(job_id, "job id")
        if "." in job_id:
            raise ValueError(f"job id {job_id!r} must not contain '.'")
        return f"{ASSET_META_PREFIX}{job_id}."

    def _versions(self, job_id: str) -> list[str]:
        prefix = self._prefix(job_id)
        return [k for k in self.storage.list(prefix, recursive=False)
                if k.endswith(".json") and "." not in k[len(prefix):-len(".json")]]

    def get(self, job_id: str) -> tuple[AssetMeta, str | None]:
        """The job's meta and its version id (``None``: never edited)."""
        for key in reversed(self._versions(job_id)):
            try:
                return AssetMeta.model_validate(self.storage.get_json(key)), _version_of(key)
            except ObjectNotFoundError:
                continue  # replaced since listing: the next older (or a newer, on the next read)
            except (ValueError, ValidationError) as e:
                log.warning("skipping unreadable asset meta %s: %s", key, e)
        return AssetMeta(), None

    def put(self, job_id: str, meta: AssetMeta) -> str:
        """Write a new version; older ones are deleted after. Returns the new version id."""
        version = new_id("meta")
        meta.updated_at = time.time()
        key = f"{self._prefix(job_id)}{version}.json"
        self.storage.put_json(key, meta.model_dump(mode="json"))
        for old in self._versions(job_id):
            if _version_of(old) < version:
                self.storage.delete(old)
        return version

    def delete(self, job_id: str) -> None:
        for key in self._versions(job_id):
            self.storage.delete(key)

    def latest_versions(self) -> dict[str, str]:
        """Every edited job's newest version id (one ``list`` of ``assets/meta/``)."""
        latest: dict[str, str] = {}
        for key in self.storage.list(ASSET_META_PREFIX, recursive=False):
            name = key[len(ASSET_META_PREFIX):]
            if not name.endswith(".json") or name.count(".") != 2:
                continue
            job_id, version = name[: -len(".json")].split(".")
            if version > latest.get(job_id, ""):
                latest[job_id] = version
        return latest


def _version_of(key: str) -> str:
    return key[: -len(".json")].rsplit(".", 1)[-1]


# --- what a record says about its asset ---------------------------------------------------------


def _find(value: Any, name: str) -> Any:
    """The first value under key ``name`` in a request (breadth first: the top level wins)."""
    queue = [value]
    while queue:
        item = queue.pop(0)
        if isinstance(item, dict):
            if item.get(name) not in (None, "", [], {}):
                return item[name]
            queue.extend(v for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            queue.extend(v for v in item if isinstance(v, (dict, list)))
    return None


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _lora_name(lora: Any) -> str | None:
    if isinstance(lora, dict):  # the result's lineage: {"name", "version", "sha256"}
        name = lora.get("name")
        return f"{name}:{lora['version']}" if name and lora.get("version") is not None else name
    return lora if isinstance(lora, str) else None


def asset_fields(record: JobRecord) -> dict[str, Any]:
    """What the index keeps of a record: prompt, model, LoRA, its input keys."""
    request, result = record.request or {}, record.result or {}
    prompt = result.get("prompt") or _find(request, "prompt")
    if not isinstance(prompt, str):  # a workflow: its prompt nodes' text
        texts = [n.get("params", {}).get("text") for n in (_find(request, "nodes") or [])
                 if isinstance(n, dict) and n.get("type") == "prompt"]
        prompt = " ".join(t for t in texts if isinstance(t, str))
    model = result.get("model") or _find(request, "model")
    lora = _lora_name(result.get("lora")) or _lora_name(_find(request, "lora"))
    inputs = sorted({s for s in _strings(request) if s.startswith((UPLOADS_PREFIX, OUTPUTS_PREFIX))})
    return {"prompt": prompt or "", "model": model if isinstance(model, str) else None,
            "lora": lora, "inputs": inputs}


def output_keys(record: JobRecord) -> set[str]:
    """The files a job made: its outputs and its stages' intermediates (``result.stages``)."""
    keys = {output.key for output in record.outputs}
    stages = (record.result or {}).get("stages")
    if isinstance(stages, dict):
        for stage in stages.values():
            if isinstance(stage, dict):
                keys.update(k for k in [stage.get("key"), stage.get("poster_key"), stage.get("handoff_key"),
                                        *(stage.get("keys") or [])] if isinstance(k, str) and k)
    return keys


# --- config --------------------------------------------------------------------------------------


class RetentionRule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_age_days: float = Field(gt=0, description="Jobs of this kind older than this (since created) go.")
    keep_favorites: bool = Field(True, description="A favourite job, or a job with a favourite output, is kept "
                                                   "whatever its age.")
    keep_tagged: bool = Field(False, description="A job with any tag (its own or an output's) is kept whatever "
                                                 "its age.")
    statuses: list[str] = Field(default_factory=lambda: sorted(TERMINAL_STATUSES),
                                description="Which finished statuses the rule applies to.")

    @field_validator("statuses")
    @classmethod
    def _terminal(cls, statuses: list[str]) -> list[str]:
        bad = [s for s in statuses if s not in TERMINAL_STATUSES]
        if bad:
            raise ValueError(f"retention applies to finished jobs only ({', '.join(sorted(TERMINAL_STATUSES))}); "
                             f"got {bad}")
        return statuses


class RetentionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="The job runners sweep on their reaper timer.")
    dry_run: bool = Field(True, description="Only report what would go (assets/retention/last.json, "
                                            "GET /v1/assets/retention); set false to delete.")
    interval_s: float = Field(3600.0, gt=0, description="How often one runner (of all) sweeps.")
    max_deletes: int = Field(1000, ge=1, description="Jobs one sweep deletes at most (the next sweep goes on).")
    kinds: dict[str, RetentionRule] = Field(
        default_factory=dict, description="A rule per job kind (e.g. images.generations); '*' for every other kind.")


class AssetsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index_dir: str | None = Field(None, description="Local folder of the derived search index (rebuilt from the "
                                                    "records if missing); default: the system temp folder.")
    sync_interval_s: float = Field(2.0, ge=0, description="How often a background thread runs the full sync "
                                                          "(jobs finished, edits and deletes on other replicas); "
                                                          "a search runs only the quick sync of unfinished jobs.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig)


# --- the index ------------------------------------------------------------------------------------


class AssetQuery(BaseModel):
    """A search: every field optional; all given ones must match."""

    q: str | None = None
    kind: str | None = None
    model: str | None = None
    lora: str | None = None  # 'name' (any version) or 'name:version'
    tag: str | None = None
    favorite: bool | None = None
    status: str | None = None
    created_after: float | None = None
    created_before: float | None = None
    owner: str | None = None  # only this owner's (None with all_owners: everyone's)
    all_owners: bool = False
    after: str | None = None  # id cursor: older than this
    limit: int = 50


_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    rowid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, owner TEXT, kind TEXT NOT NULL,
    status TEXT NOT NULL, terminal INTEGER NOT NULL, prompt TEXT NOT NULL DEFAULT '', model TEXT,
    lora TEXT, lora_name TEXT, created_at REAL NOT NULL, outputs INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0, tags TEXT NOT NULL DEFAULT '', favorite INTEGER NOT NULL DEFAULT 0,
    meta_version TEXT, meta TEXT, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS assets_owner_id ON assets(owner, id);
CREATE INDEX IF NOT EXISTS assets_kind_id ON assets(kind, id);
CREATE INDEX IF NOT EXISTS assets_created ON assets(created_at);
CREATE INDEX IF NOT EXISTS assets_owner_created ON assets(owner, created_at);
CREATE INDEX IF NOT EXISTS assets_owner_favorite ON assets(owner, favorite, id);
CREATE TABLE IF NOT EXISTS asset_tags (tag TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (tag, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS asset_tags_id ON asset_tags(id);
CREATE TABLE IF NOT EXISTS asset_inputs (key TEXT NOT NULL, id TEXT NOT NULL, PRIMARY KEY (key, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS asset_inputs_id ON asset_inputs(id);
CREATE VIRTUAL TABLE IF NOT EXISTS assets_fts USING fts5(prompt, tags, content='assets', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS assets_ai AFTER INSERT ON assets BEGIN
    INSERT INTO assets_fts(rowid, prompt, tags) VALUES (new.rowid, new.prompt, new.tags); END;
CREATE TRIGGER IF NOT EXISTS assets_ad AFTER DELETE ON assets BEGIN
    INSERT INTO assets_fts(assets_fts, rowid, prompt, tags) VALUES ('delete', old.rowid, old.prompt, old.tags); END;
CREATE TRIGGER IF NOT EXISTS assets_au AFTER UPDATE OF prompt, tags ON assets BEGIN
    INSERT INTO assets_fts(assets_fts, rowid, prompt, tags) VALUES ('delete', old.rowid, old.prompt, old.tags);
    INSERT INTO assets_fts(rowid, prompt, tags) VALUES (new.rowid, new.prompt, new.tags); END;
"""
_SCHEMA_VERSION = 2  # 2: the meta column (per-output marks)
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,199}")
_WORD_RE = re.compile(r"\w+", re.UNICODE)


def fts_query(text: str) -> str | None:
    """Words of ``text`` as an FTS5 query: every word, each as a prefix (``"lig"*`` finds lighthouse)."""
    words = _WORD_RE.findall(text.lower())
    return " AND ".join(f'"{w}"*' for w in words[:16]) if words else None


class AssetIndex:
    """A local, derived SQLite FTS5 index of the job records (see the module docstring)."""

    def __init__(self, storage: Storage, path: str | None = None, sync_interval_s: float = 2.0,
                 read_threads: int = 8):
        self.storage = storage
        self.jobs = JobStore(storage)
        self.meta = AssetMetaStore(storage)
        self.sync_interval_s = sync_interval_s
        self.read_threads = read_threads
        if path is None:
            path = default_index_path(storage)
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db_lock = threading.RLock()
        self._sync_lock = threading.Lock()
        self._last_sync = 0.0  # monotonic end of the last full sync (0: none yet)
        self._sync_began = 0.0  # wall clock start of the last full sync's listing
        self._fresh_at = 0.0  # monotonic end of the last full sync or catch-up
        self._syncer: threading.Thread | None = None
        self._syncer_lock = threading.Lock()  # not _sync_lock: starting it never waits for a sync
        self._quick_lock = threading.Lock()
        self._note_lock = threading.Lock()
        self._noted: set[str] = set()
        self._closed = threading.Event()
        with self._db_lock:
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):  # an older layout: it is derived, so start again
                for table in ("assets_fts", "asset_tags", "asset_inputs", "assets"):
                    self._db.execute(f"DROP TABLE IF EXISTS {table}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            # what this process believes the index holds: id -> terminal; id -> meta version
            self._known: dict[str, bool] = {}
            self._unfinished: set[str] = set()
            self._meta_known: dict[str, str] = {}
            self._reload_known()

    def close(self) -> None:
        self._closed.set()
        with self._db_lock:
            self._db.close()

    # -- sync -------------------------------------------------------------------------------

    def refresh(self, build: bool = True) -> bool:
        """What a search runs first: the quick sync (unfinished jobs: new ones from the
        ``jobs/active/`` markers and from :meth:`note`, and those it holds as unfinished, read
        again). The full sync runs on a background thread every ``sync_interval_s``, started by the
        first call, which waits for the first full sync (the build), or with ``build=False`` leaves
        it to that thread and returns False (the caller answers from the records meanwhile). With
        ``sync_interval_s == 0`` every call runs a full sync instead (tests). True: the index is
        up to date as described in the module docstring."""
        if self.sync_interval_s == 0:
            self.sync()
            return True
        if not self._last_sync:
            if not build:
                self._start_syncer()
                return False
            self.sync()
        self._start_syncer()
        # its own lock: a search never waits for a full sync running in the background (their
        # writes are upserts of what each read; a record the full sync read before it finished is
        # read again by the next quick sync, as it is then held as unfinished)
        with self._quick_lock:
            self._quick_sync_locked()
        return True

    def catch_up(self, max_age_s: float = 0.0) -> None:
        """Make the index hold every job that can name a file made so far (before a delete decides
        whether a file is shared), without listing every job id: the quick sync, then the jobs made
        since the last full sync began (less :data:`CLOCK_SKEW_S`), found by listing only the id
        prefixes of that span. The first call builds the index instead. Skipped when the last full
        sync or catch-up ended under ``max_age_s`` ago (a retention sweep deleting many jobs)."""
        if not self._last_sync or self.sync_interval_s == 0:
            self.sync()
            return
        if max_age_s > 0 and time.monotonic() - self._fresh_at <= max_age_s:
            return
        since = self._sync_began - CLOCK_SKEW_S
        self.refresh()
        new = [i for i in self._recent_ids(since) if i not in self._known and _JOB_ID_RE.fullmatch(i)]
        self._write_records(self._read_records(new))
        self._fresh_at = time.monotonic()

    def _recent_ids(self, since: float) -> set[str]:
        """Ids of the jobs made from ``since`` (epoch seconds) to :data:`CLOCK_SKEW_S` from now: a
        listing of the one to four ``jobs/job_<time hex>`` prefixes that cover the span (job ids are
        :func:`storage.keys.new_id`: ``job_`` and 12 hex digits of milliseconds first)."""
        lo, hi = max(0, int(since * 1000)), int((time.time() + CLOCK_SKEW_S) * 1000)
        digits = next(d for d in range(12, -1, -1) if (hi >> 4 * (12 - d)) - (lo >> 4 * (12 - d)) < 4)
        shift = 4 * (12 - digits)
        prefixes = [f"{JOBS_PREFIX}job_{p:0{digits}x}" if digits else f"{JOBS_PREFIX}job_"
                    for p in range(lo >> shift, (hi >> shift) + 1)]
        start = len(JOBS_PREFIX)
        return {key[start:-5] for prefix in prefixes for key in self.storage.list(prefix, recursive=False)
                if key.endswith(".json") and "/" not in key[start:]}

    def note(self, job_id: str) -> None:
        """A job this process just made: the next quick sync reads it (until it is terminal)."""
        with self._note_lock:
            self._noted.add(job_id)

    def _start_syncer(self) -> None:
        if self._syncer is None:
            with self._syncer_lock:
                if self._syncer is None:
                    self._syncer = threading.Thread(target=self._sync_forever, name="asset-index-sync", daemon=True)
                    self._syncer.start()

    def _sync_forever(self) -> None:
        while True:
            if not self._last_sync or time.monotonic() - self._last_sync >= self.sync_interval_s:
                try:
                    self.sync()
                except Exception:  # a storage hiccup: the next pass tries again
                    log.exception("asset index sync failed")
            if self._closed.wait(self.sync_interval_s):
                return

    def _quick_sync_locked(self) -> None:
        with self._note_lock:
            noted, self._noted = self._noted, set()
        new = [i for i in self.jobs.active_ids() if i not in self._known]
        to_read = sorted({*new, *noted, *self._unfinished})
        if to_read:
            self._write_records(self._read_records(to_read))
        # a new job's meta (tagged before this index saw it) comes with the next full sync

    def _write_records(self, records: dict[str, tuple[JobRecord, int] | None]) -> None:
        if not records:
            return
        with self._db_lock:
            self._db.execute("BEGIN")
            try:
                for job_id, record in records.items():
                    if record is None:
                        self._forget(job_id)
                    else:
                        self._upsert(*record)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._reload_known()
                raise

    def sync(self) -> dict[str, int]:
        """Bring the index up to the records and the meta; returns counts of what changed."""
        with self._sync_lock:
            return self._sync_locked()

    def _sync_locked(self) -> dict[str, int]:
        started, began = time.monotonic(), time.time()
        listed = self._listed_ids()
        gone = [i for i in self._known if i not in listed]
        to_read = [i for i in listed if (i not in self._known and _JOB_ID_RE.fullmatch(i)) or i in self._unfinished]
        records = self._read_records(to_read)
        latest_meta = self.meta.latest_versions()
        meta_changed = [i for i, v in latest_meta.items() if i in listed and self._meta_known.get(i) != v]
        meta_dropped = [i for i in self._meta_known if i not in latest_meta and i in listed]
        metas = dict(zip(meta_changed, self._map(lambda i: self.meta.get(i), meta_changed)))
        with self._db_lock:
            self._db.execute("BEGIN")
            try:
                for job_id in gone:
                    self._forget(job_id)
                for job_id, record in records.items():
                    if record is None:
                        self._forget(job_id)
                    else:
                        self._upsert(*record)
                for job_id, (meta, version) in metas.items():
                    self._set_meta(job_id, meta, version)
                for job_id in meta_dropped:
                    self._set_meta(job_id, AssetMeta(), None)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                # what this process knows may now be ahead of the database: start again next time
                self._reload_known()
                raise
        self._last_sync = self._fresh_at = time.monotonic()
        self._sync_began = began
        counts = {"listed": len(listed), "read": len(records), "removed": len(gone),
                  "meta": len(metas) + len(meta_dropped)}
        log.debug("asset index sync in %.3f s: %s", self._last_sync - started, counts)
        return counts

    def _listed_ids(self) -> set[str]:
        """Every job id in ``jobs/`` (one ``list``; ids are checked when their record is read)."""
        start = len(JOBS_PREFIX)
        return {key[start:-5] for key in self.storage.list(JOBS_PREFIX, recursive=False)
                if key.endswith(".json") and "/" not in key[start:]}

    def _reload_known(self) -> None:
        with self._db_lock:
            self._known = {i: bool(t) for i, t in self._db.execute("SELECT id, terminal FROM assets")}
            self._unfinished = {i for i, t in self._known.items() if not t}
            self._meta_known = {i: v for i, v in self._db.execute(
                "SELECT id, meta_version FROM assets WHERE meta_version IS NOT NULL")}

    def _map(self, fn, items: list) -> list:
        if len(items) < 32 or self.read_threads <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(self.read_threads) as pool:
            return list(pool.map(fn, items, chunksize=64))

    def _read_records(self, ids: list[str]) -> dict[str, tuple[JobRecord, int] | None]:
        def read(job_id: str) -> tuple[JobRecord, int] | None:
            try:
                record = self.jobs.get(job_id)
            except JobNotFoundError:
                return None
            except (ValueError, ValidationError) as e:
                log.warning("asset index: skipping unreadable job record %s: %s", job_id, e)
                return None
            size = 0
            if record.is_terminal:
                for key in output_keys(record):
                    try:
                        size += self.storage.size(key)
                    except (ObjectNotFoundError, InvalidKeyError):
                        pass
            return record, size

        return dict(zip(ids, self._map(read, ids)))

    # -- writes (under _db_lock) ---------------------------------------------------------------

    def _upsert(self, record: JobRecord, size: int) -> None:
        fields = asset_fields(record)
        lora = fields["lora"]
        row = (record.id, record.owner, record.kind, record.status, int(record.is_terminal), fields["prompt"],
               fields["model"], lora, lora.split(":", 1)[0] if lora else None, record.created_at,
               len(record.outputs), size, json.dumps(record.model_dump(mode="json"), separators=(",", ":")))
        self._db.execute(
            "INSERT INTO assets (id, owner, kind, status, terminal, prompt, model, lora, lora_name, created_at, "
            "outputs, bytes, record) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
            "owner=excluded.owner, kind=excluded.kind, status=excluded.status, terminal=excluded.terminal, "
            "prompt=excluded.prompt, model=excluded.model, lora=excluded.lora, lora_name=excluded.lora_name, "
            "created_at=excluded.created_at, outputs=excluded.outputs, bytes=excluded.bytes, record=excluded.record",
            row)
        if record.id not in self._known:
            self._db.executemany("INSERT OR IGNORE INTO asset_inputs (key, id) VALUES (?, ?)",
                                 [(k, record.id) for k in fields["inputs"]])
        self._known[record.id] = record.is_terminal
        if record.is_terminal:
            self._unfinished.discard(record.id)
        else:
            self._unfinished.add(record.id)

    def _set_meta(self, job_id: str, meta: AssetMeta, version: str | None) -> None:
        tags = meta.all_tags  # the job is found by its own tags and its outputs'
        self._db.execute("UPDATE assets SET tags=?, favorite=?, meta_version=?, meta=? WHERE id=?",
                         ("\x1f".join(tags), int(meta.any_favorite), version,
                          meta.model_dump_json(exclude={"updated_at"}), job_id))
        self._db.execute("DELETE FROM asset_tags WHERE id=?", (job_id,))
        self._db.executemany("INSERT OR IGNORE INTO asset_tags (tag, id) VALUES (?, ?)",
                             [(t, job_id) for t in tags])
        if version is None or job_id not in self._known:  # not indexed yet: the sync reads its meta then
            self._meta_known.pop(job_id, None)
        else:
            self._meta_known[job_id] = version

    def _forget(self, job_id: str) -> None:
        self._db.execute("DELETE FROM assets WHERE id=?", (job_id,))
        self._db.execute("DELETE FROM asset_tags WHERE id=?", (job_id,))
        self._db.execute("DELETE FROM asset_inputs WHERE id=?", (job_id,))
        self._known.pop(job_id, None)
        self._unfinished.discard(job_id)
        self._meta_known.pop(job_id, None)

    # -- this replica's own changes, seen at once -----------------------------------------------

    def put_meta(self, job_id: str, meta: AssetMeta) -> str:
        """Write the shared meta record and apply it to this index."""
        version = self.meta.put(job_id, meta)
        with self._db_lock:
            self._set_meta(job_id, meta, version)
        return version

    def forget(self, job_id: str) -> None:
        with self._db_lock:
            self._forget(job_id)

    # -- reads --------------------------------------------------------------------------------

    def search(self, query: AssetQuery) -> list[dict[str, Any]]:
        """Newest first, at most ``query.limit``: rows with ``record`` (the JobRecord JSON), ``meta``
        (its :class:`AssetMeta`), ``tags`` and ``favorite`` (the job's own) and ``bytes``. A
        ``favorite`` or ``tag`` query matches the job's own marks or any output's."""
        where, params = self._where(query)
        if query.after is not None:
            where.append("a.id < ?")
            params.append(query.after)
        sql = (f"SELECT a.record, a.meta, a.bytes FROM assets a WHERE {' AND '.join(where) or '1'} "
               "ORDER BY a.id DESC LIMIT ?")
        with self._db_lock:
            rows = self._db.execute(sql, [*params, query.limit]).fetchall()
        out = []
        for record, meta_json, size in rows:
            meta = AssetMeta.model_validate_json(meta_json) if meta_json else AssetMeta()
            out.append({"record": json.loads(record), "meta": meta, "tags": meta.tags, "favorite": meta.favorite,
                        "bytes": size})
        return out

    def _where(self, query: AssetQuery) -> tuple[list[str], list[Any]]:
        where: list[str] = []
        params: list[Any] = []
        if not query.all_owners:
            where.append("a.owner = ?")
            params.append(query.owner)  # None: matches nothing (a caller with no owner who is not admin)
        if query.q:
            match = fts_query(query.q)
            if match:
                where.append("a.rowid IN (SELECT rowid FROM assets_fts WHERE assets_fts MATCH ?)")
                params.append(match)
        for column in ("kind", "model", "status"):
            value = getattr(query, column)
            if value is not None:
                where.append(f"a.{column} = ?")
                params.append(value)
        if query.lora is not None:
            where.append("a.lora = ?" if ":" in query.lora else "a.lora_name = ?")
            params.append(query.lora)
        if query.tag is not None:
            where.append("a.id IN (SELECT id FROM asset_tags WHERE tag = ?)")
            params.append(query.tag)
        if query.favorite is not None:
            where.append("a.favorite = ?")
            params.append(int(query.favorite))
        if query.created_after is not None:
            where.append("a.created_at >= ?")
            params.append(query.created_after)
        if query.created_before is not None:
            where.append("a.created_at < ?")
            params.append(query.created_before)
        return where, params

    def stats(self, owner: str | None, all_owners: bool) -> dict[str, dict[str, int]]:
        """Per job kind: jobs, outputs, bytes of their files, favourites (jobs with a favourite output)."""
        where, params = self._where(AssetQuery(owner=owner, all_owners=all_owners))
        sql = ("SELECT kind, COUNT(*), SUM(outputs), SUM(bytes), SUM(favorite) FROM assets a "
               f"WHERE {' AND '.join(where) or '1'} GROUP BY kind ORDER BY kind")
        with self._db_lock:
            rows = self._db.execute(sql, params).fetchall()
        return {kind: {"jobs": n, "outputs": o or 0, "bytes": b or 0, "favorites": f or 0}
                for kind, n, o, b, f in rows}

    def tags(self, owner: str | None, all_owners: bool, limit: int = 200) -> list[tuple[str, int]]:
        where, params = self._where(AssetQuery(owner=owner, all_owners=all_owners))
        sql = (f"SELECT t.tag, COUNT(*) FROM asset_tags t JOIN assets a ON a.id = t.id "
               f"WHERE {' AND '.join(where) or '1'} GROUP BY t.tag ORDER BY COUNT(*) DESC, t.tag LIMIT ?")
        with self._db_lock:
            return [(t, n) for t, n in self._db.execute(sql, [*params, limit])]

    def referencing(self, key: str, exclude: Iterable[str] = ()) -> list[str]:
        """Ids of the indexed jobs, but ``exclude``, whose request names ``key`` (sync first for a
        decision that deletes)."""
        excluded = set(exclude)
        with self._db_lock:
            rows = self._db.execute("SELECT id FROM asset_inputs WHERE key = ? ORDER BY id DESC", (key,)).fetchall()
        return [r[0] for r in rows if r[0] not in excluded]

    def retention_candidates(self, config: RetentionConfig, now: float) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        explicit = [k for k in config.kinds if k != "*"]
        with self._db_lock:
            for kind, rule in config.kinds.items():
                where = ["terminal = 1", "created_at < ?",
                         f"status IN ({','.join('?' * len(rule.statuses))})"]
                params: list[Any] = [now - rule.max_age_days * 86400.0, *rule.statuses]
                if kind == "*":
                    if explicit:
                        where.append(f"kind NOT IN ({','.join('?' * len(explicit))})")
                        params.extend(explicit)
                else:
                    where.append("kind = ?")
                    params.append(kind)
                if rule.keep_favorites:
                    where.append("favorite = 0")
                if rule.keep_tagged:
                    where.append("tags = ''")
                sql = (f"SELECT id, kind, owner, created_at, bytes, status FROM assets WHERE {' AND '.join(where)} "
                       "ORDER BY id LIMIT ?")
                for i, k, o, c, b, s in self._db.execute(sql, [*params, config.max_deletes + 1]):
                    out.append({"id": i, "kind": k, "owner": o, "created_at": c, "bytes": b, "status": s,
                                "rule": kind})
        out.sort(key=lambda r: r["id"])
        return out


def default_index_path(storage: Storage, index_dir: str | None = None, role: str = "ingress") -> str:
    """``<index_dir or tmp>/atelier-assets/<hash of the storage root>-<role>.sqlite``: one index per
    storage root and process role on a node (processes of one role share it; SQLite locks it)."""
    digest = hashlib.sha256(repr(storage).encode()).hexdigest()[:16]
    folder = index_dir or os.path.join(tempfile.gettempdir(), "atelier-assets")
    return os.path.join(folder, f"{digest}-{role}.sqlite")


# --- deletes ---------------------------------------------------------------------------------------


class DeleteReport(BaseModel):
    id: str
    deleted: list[str] = Field(default_factory=list, description="Files deleted.")
    kept: list[str] = Field(default_factory=list, description="Files kept: another job uses them.")


def delete_job_assets(index: AssetIndex, record: JobRecord, max_staleness_s: float = 0.0) -> DeleteReport:
    """Delete a finished job's files, meta and record, and drop just that job from the index; a file
    another job names stays (see module doc). The index catches up first (:meth:`AssetIndex.catch_up`,
    not a listing of every job), unless it did under ``max_staleness_s`` ago (a retention sweep)."""
    if not record.is_terminal:
        raise ValueError(f"job {record.id} is {record.status}; cancel it and delete it once it has stopped")
    index.catch_up(max_staleness_s)  # every job that can name these files is in the inputs table
    report = DeleteReport(id=record.id)
    for key in sorted(output_keys(record)):
        (report.kept if index.referencing(key, exclude=[record.id]) else report.deleted).append(key)
    for key in asset_fields(record)["inputs"]:
        if key in report.deleted or key in report.kept or index.referencing(key, exclude=[record.id]):
            continue
        if key.startswith(UPLOADS_PREFIX) or _orphaned_output(index.jobs, key, record.id):
            report.deleted.append(key)
    for key in report.deleted:
        try:
            index.storage.delete(key)
        except InvalidKeyError:
            pass
    index.meta.delete(record.id)
    index.jobs.delete(record.id)
    index.forget(record.id)
    return report


def _orphaned_output(jobs: JobStore, key: str, deleting: str) -> bool:
    """An output whose job was deleted while this one used it (so it was kept)."""
    owner = output_owner(key)
    if owner is None or owner[0] != "job" or owner[1] == deleting:
        return False
    try:
        jobs.get(owner[1])
    except JobNotFoundError:
        return True
    return False


# --- retention -------------------------------------------------------------------------------------


class RetentionReport(BaseModel):
    dry_run: bool
    ran_at: float
    policy: dict[str, RetentionRule]
    jobs: list[dict[str, Any]] = Field(default_factory=list, description="What went (or would go).")
    count: int = 0
    bytes: int = 0
    more: bool = Field(False, description="More would go than max_deletes: the next sweep goes on.")


class Retention:
    """Plan and apply a :class:`RetentionConfig` over an index."""

    def __init__(self, index: AssetIndex, config: RetentionConfig):
        self.index = index
        self.config = config

    def run(self, dry_run: bool | None = None, now: float | None = None) -> RetentionReport:
        dry_run = self.config.dry_run if dry_run is None else dry_run
        now = time.time() if now is None else now
        self.index.sync()
        candidates = self.index.retention_candidates(self.config, now)
        more = len(candidates) > self.config.max_deletes
        report = RetentionReport(dry_run=dry_run, ran_at=now, policy=self.config.kinds, more=more)
        for item in candidates[: self.config.max_deletes]:
            if not dry_run:
                record = self._still_due(item["id"], now)
                if record is None:
                    continue
                item["deleted"] = delete_job_assets(self.index, record, max_staleness_s=2.0).deleted
            report.jobs.append(item)
            report.bytes += item["bytes"]
        report.count = len(report.jobs)
        self.index.storage.put_json(RETENTION_REPORT_KEY, report.model_dump(mode="json"))
        return report

    def _still_due(self, job_id: str, now: float) -> JobRecord | None:
        """Re-read the record and its meta (another replica may have favourited it since the last sync)."""
        try:
            record = self.index.jobs.get(job_id)
        except (JobNotFoundError, ValueError, ValidationError):
            return None
        rule = self.config.kinds.get(record.kind) or self.config.kinds.get("*")
        if rule is None or not record.is_terminal or record.status not in rule.statuses:
            return None
        if record.created_at >= now - rule.max_age_days * 86400.0:
            return None
        meta, _ = self.index.meta.get(job_id)
        if (rule.keep_favorites and meta.any_favorite) or (rule.keep_tagged and meta.all_tags):
            return None
        return record

    def sweep(self, now: float | None = None) -> RetentionReport | None:
        """The timer's pass: only the runner that takes this period's lease sweeps."""
        if not self.config.enabled or not self.config.kinds:
            return None
        now = time.time() if now is None else now
        period = int(now // self.config.interval_s)
        if not self.index.storage.put_if_absent(f"{SWEEP_LEASE_PREFIX}{period:012d}", b""):
            return None
        for key in self.index.storage.list(SWEEP_LEASE_PREFIX):
            if key < f"{SWEEP_LEASE_PREFIX}{period - 1:012d}":
                self.index.storage.delete(key)
        report = self.run(now=now)
        log.info("retention sweep (%s): %d jobs, %d bytes", "dry run" if report.dry_run else "applied",
                 report.count, report.bytes)
        return report


def last_retention_report(storage: Storage) -> RetentionReport | None:
    try:
        return RetentionReport.model_validate(storage.get_json(RETENTION_REPORT_KEY))
    except (ObjectNotFoundError, ValueError, ValidationError):
        return None

