"""Fine-tuning job records and run-name claims.

Layout under the storage root::

    fine_tuning/jobs/<job id>.json                   the job: {"id", "created_at", "config", "plan",
                                                     "metadata"} (+ "submit_error" when Ray refused it)
    fine_tuning/runs/<run_name>/<generation>.json    a claim of the run name: {"job_id", "claimed_at"}

One run folder (``training/<run_name>/``) belongs to one job at a time. A job claims its run name
by creating the next generation's claim only if nothing is there (create-if-absent, as the LoRA
registry claims versions in :mod:`storage.registry`). Whether the job holding the latest claim
still holds it (queued or running) is the caller's to say (``holder_of``): it asks Ray.

A record never holds the storage credentials: ``config.storage_options`` is dropped when a record
is written, and when one written before that rule is read.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable, NamedTuple

from storage.fs import ObjectNotFoundError, Storage

__all__ = [
    "RECORDS_PREFIX",
    "CLAIMS_PREFIX",
    "MAX_CLAIM_ATTEMPTS",
    "Claim",
    "FineTuningJobNotFoundError",
    "FineTuningStore",
]

RECORDS_PREFIX = "fine_tuning/jobs/"
CLAIMS_PREFIX = "fine_tuning/runs/"
MAX_CLAIM_ATTEMPTS = 20
_JOB_ID = re.compile(r"ftjob-[A-Za-z0-9]+")


class FineTuningJobNotFoundError(LookupError):
    """No record of this job id (or the id is not one)."""

    def __init__(self, job_id: str):
        super().__init__(job_id)
        self.job_id = job_id


class Claim(NamedTuple):
    claimed: bool  # this job now holds the run name
    holder: str | None = None  # else the job that holds it, if one does (None: lost every race)


def _without_credentials(record: dict) -> dict:
    """The record without ``config.storage_options`` (S3 keys: the job's environment carries them)."""
    config = record.get("config")
    if isinstance(config, dict) and "storage_options" in config:
        return {**record, "config": {k: v for k, v in config.items() if k != "storage_options"}}
    return record


class FineTuningStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    # --- job records ----------------------------------------------------------------------------

    @staticmethod
    def record_key(job_id: str) -> str:
        return f"{RECORDS_PREFIX}{job_id}.json"

    def get(self, job_id: str) -> dict:
        if not _JOB_ID.fullmatch(job_id):
            raise FineTuningJobNotFoundError(job_id)
        try:
            return _without_credentials(self.storage.get_json(self.record_key(job_id)))
        except ObjectNotFoundError:
            raise FineTuningJobNotFoundError(job_id) from None

    def put(self, record: dict) -> None:
        self.storage.put_json(self.record_key(record["id"]), _without_credentials(record))

    def list(self) -> list[dict]:
        """Every record, newest first."""
        records = []
        for key in self.storage.list(RECORDS_PREFIX):
            try:
                records.append(_without_credentials(self.storage.get_json(key)))
            except ObjectNotFoundError:
                continue
        records.sort(key=lambda r: r["created_at"], reverse=True)
        return records

    # --- run-name claims ------------------------------------------------------------------------

    @staticmethod
    def claim_key(run_name: str, generation: int) -> str:
        return f"{CLAIMS_PREFIX}{run_name}/{generation:08d}.json"

    def latest_claim(self, run_name: str) -> tuple[int, dict | None]:
        """``(generation, claim)`` of the newest claim of a run name; ``(0, None)`` if it was never claimed."""
        prefix = f"{CLAIMS_PREFIX}{run_name}/"
        generations = sorted(int(m[1]) for key in self.storage.list(prefix)
                             if (m := re.fullmatch(r"(\d+)\.json", key[len(prefix):])))
        if not generations:
            return 0, None
        try:
            return generations[-1], self.storage.get_json(self.claim_key(run_name, generations[-1]))
        except (ObjectNotFoundError, ValueError):
            return generations[-1], {}

    def claim(self, run_name: str, job_id: str, holder_of: Callable[[dict], str | None]) -> Claim:
        """Claim `run_name` for `job_id` unless the job holding its latest claim still holds it
        (``holder_of(claim)``: that job's id, or None once it is finished)."""
        claim = json.dumps({"job_id": job_id, "claimed_at": time.time()}).encode()
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            generation, latest = self.latest_claim(run_name)
            holder = holder_of(latest) if latest is not None else None
            if holder is not None:
                return Claim(False, holder)
            # create-if-absent: of two submissions that both saw the name free, one gets it
            if self.storage.put_if_absent(self.claim_key(run_name, generation + 1), claim, "application/json"):
                return Claim(True)
        return Claim(False)
