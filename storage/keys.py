"""Key layout under the storage root.

Every artifact Atelier writes lives at a key built by one of these functions, so the layout is
defined in one place::

    outputs/YYYY/MM/DD/<id>/<index>.<ext>     generated images / videos (UTC date)
    jobs/<job_id>.json                        job record
    jobs/<job_id>.cancel                      cancel marker (written by the ingress only)
    models/loras/<name>/<version>/            LoRA adapter files
    datasets/<id>/ , datasets/<id>/v<N>/      training datasets
    imports/...                               never written by Atelier: files an operator puts
                                              there for prefix imports into datasets (the only
                                              part of the root an import may read)

Ids that end up inside keys are validated with :func:`validate_id`: only ``[A-Za-z0-9_.-]``,
no leading dot (so ``.``/``..``/hidden names are impossible), at most 200 characters.
A bad id raises ``ValueError`` with a message naming what was wrong.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from datetime import datetime, timezone

__all__ = [
    "validate_id",
    "new_id",
    "output_key",
    "job_key",
    "job_cancel_key",
    "lora_prefix",
    "dataset_prefix",
    "JOBS_PREFIX",
    "JOBS_ACTIVE_PREFIX",
    "job_active_key",
    "OUTPUTS_PREFIX",
    "LORAS_PREFIX",
    "DATASETS_PREFIX",
    "IMPORTS_PREFIX",
    "id_time",
    "owner_tag",
    "owner_active_prefix",
    "output_owner",
]

JOBS_PREFIX = "jobs/"
OUTPUTS_PREFIX = "outputs/"
LORAS_PREFIX = "models/loras/"
DATASETS_PREFIX = "datasets/"
# Everything else in the root (jobs, outputs, uploads, datasets, models, training, workflows,
# fine_tuning, and whatever comes next) is Atelier's own data; a dataset prefix import reads
# only under this prefix (storage.datasets.check_prefix_allowed).
IMPORTS_PREFIX = "imports/"

MAX_ID_LENGTH = 200
_ID_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_EXT_RE = re.compile(r"[A-Za-z0-9]{1,16}")


def validate_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe id for use inside a key, else raise ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"{what} is too long ({len(value)} > {MAX_ID_LENGTH} characters)")
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"{what} {value!r} may only contain letters, digits, '_', '.' and '-'")
    if value.startswith("."):
        raise ValueError(f"{what} {value!r} must not start with '.'")
    return value


# --- time-sortable ids -------------------------------------------------------------------

_id_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
_RAND_MAX = 0xFFFFFFFF


def _after_fork() -> None:  # a forked child must not continue the parent's sequence
    global _id_lock, _last_ms, _last_rand
    _id_lock = threading.Lock()
    _last_ms, _last_rand = -1, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def new_id(prefix: str) -> str:
    """A unique id ``f"{prefix}_" + 12 hex (ms timestamp) + 8 hex (random)``.

    Lexicographic order equals creation order: across processes to the millisecond, and
    strictly within one process (ids made in the same millisecond, or after the clock stepped
    back, increment the previous random part, ULID-style).
    """
    validate_id(prefix, "id prefix")
    global _last_ms, _last_rand
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            rand = _last_rand + 1
            if rand > _RAND_MAX:  # 4 billion ids in one ms: borrow the next millisecond
                ms += 1
                rand = int.from_bytes(os.urandom(4), "big") >> 1
        else:
            # top bit clear leaves room to increment within the millisecond
            rand = int.from_bytes(os.urandom(4), "big") >> 1
        _last_ms, _last_rand = ms, rand
    return f"{prefix}_{ms & 0xFFFFFFFFFFFF:012x}{rand:08x}"


_NEW_ID_RE = re.compile(r"[A-Za-z0-9_.\-]+_([0-9a-f]{12})[0-9a-f]{8}")


def id_time(value: str) -> float | None:
    """When an id made by :func:`new_id` was made (epoch seconds), or None for another id."""
    m = _NEW_ID_RE.fullmatch(value) if isinstance(value, str) else None
    return int(m.group(1), 16) / 1000.0 if m else None


# --- key builders ------------------------------------------------------------------------


def _ext(ext: str) -> str:
    if not isinstance(ext, str):
        raise ValueError("ext must be a string")
    e = ext[1:] if ext.startswith(".") else ext
    if not _EXT_RE.fullmatch(e):
        raise ValueError(f"ext {ext!r} must be 1-16 letters or digits")
    return e.lower()


def _nonneg_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def output_key(
    job_or_request_id: str, index: int, ext: str = "png", when: datetime | None = None
) -> str:
    """``outputs/YYYY/MM/DD/<id>/<index>.<ext>``; the date is UTC (``when`` defaults to now).

    A naive ``when`` is taken as already being UTC.
    """
    validate_id(job_or_request_id, "job or request id")
    _nonneg_int(index, "index")
    if when is None:
        when = datetime.now(timezone.utc)
    elif when.tzinfo is not None:
        when = when.astimezone(timezone.utc)
    return (
        f"{OUTPUTS_PREFIX}{when.year:04d}/{when.month:02d}/{when.day:02d}/"
        f"{job_or_request_id}/{index}.{_ext(ext)}"
    )


def job_key(job_id: str) -> str:
    """``jobs/<job_id>.json``"""
    return f"{JOBS_PREFIX}{validate_id(job_id, 'job id')}.json"


JOBS_ACTIVE_PREFIX = f"{JOBS_PREFIX}active/"


def job_active_key(job_id: str) -> str:
    """``jobs/active/<job_id>``: present while the job is unfinished (queue depth, reaper)."""
    return f"{JOBS_ACTIVE_PREFIX}{validate_id(job_id, 'job id')}"


JOBS_OWNERS_PREFIX = f"{JOBS_PREFIX}owners/"


def owner_active_prefix(owner: str) -> str:
    """``jobs/owners/<owner tag>/active/``: one marker per unfinished job of an owner (its cap)."""
    return f"{JOBS_OWNERS_PREFIX}{owner_tag(owner)}/active/"


def job_cancel_key(job_id: str) -> str:
    """``jobs/<job_id>.cancel``"""
    return f"{JOBS_PREFIX}{validate_id(job_id, 'job id')}.cancel"


def lora_prefix(name: str, version: str | int) -> str:
    """``models/loras/<name>/<version>/``"""
    validate_id(name, "LoRA name")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(_nonneg_int(version, "LoRA version"))
    validate_id(version, "LoRA version")
    return f"{LORAS_PREFIX}{name}/{version}/"


def dataset_prefix(dataset_id: str, version: int | None = None) -> str:
    """``datasets/<id>/`` or, with a version, ``datasets/<id>/v<version>/``."""
    validate_id(dataset_id, "dataset id")
    if version is None:
        return f"{DATASETS_PREFIX}{dataset_id}/"
    return f"{DATASETS_PREFIX}{dataset_id}/v{_nonneg_int(version, 'dataset version')}/"


# --- owners ------------------------------------------------------------------------------


def owner_tag(owner: str | None) -> str | None:
    """A short, key-safe tag of a tenant (16 hex of its SHA-256); None for no owner. It names,
    never authorises: a caller is matched against its own tag."""
    return hashlib.sha256(owner.encode()).hexdigest()[:16] if owner else None


_OUTPUT_RE = re.compile(rf"{OUTPUTS_PREFIX}\d{{4}}/\d{{2}}/\d{{2}}/([^/]+)/[^/]+")
_TAGGED_RE = re.compile(r"[a-z]+-([0-9a-f]{16})_[0-9a-f]{20}")


def output_owner(key: str) -> tuple[str, str] | None:
    """Whose output ``key`` is, as far as its name tells: ``("job", <job id>)`` for a job's output
    (``outputs/…/<job id>[.<stage>]/…``), ``("tag", <owner tag>)`` for a synchronous request's
    (its id made by ``new_id(f"img-{owner_tag}")``), None otherwise (no owner recorded)."""
    m = _OUTPUT_RE.fullmatch(key) if isinstance(key, str) else None
    if m is None:
        return None
    base = m.group(1).split(".", 1)[0]
    if base.startswith("job_"):
        return "job", base
    tagged = _TAGGED_RE.fullmatch(base)
    return ("tag", tagged.group(1)) if tagged else None
