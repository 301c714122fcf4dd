"""Output files: their URLs (served here, or presigned S3 URLs) and reading them back."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import IO

from api.auth import caller
from deployments.errors import NotFoundError
from storage.datasets import DatasetNotFoundError, DatasetStore, is_dataset_image_key
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage
from storage.jobs import JobNotFoundError, JobStore
from storage.keys import OUTPUTS_PREFIX, new_id, output_owner, owner_tag

SERVED_PREFIXES = (OUTPUTS_PREFIX,)
_OWNER_CACHE_SIZE = 10_000


@dataclass
class FileStream:
    """A file to stream (`handle`, `size`), or where to find it (`redirect`: a presigned URL)."""

    size: int = 0
    handle: IO[bytes] | None = None
    redirect: str | None = None


class FilesService:
    """Files are owned as what made them is: a job's outputs by the job's owner, a synchronous
    request's by the tenant its output id is tagged with (`output_id`), a dataset's images by the
    dataset's owner (readable by all when it is public). Another owner's file is a 404."""

    def __init__(self, storage: Storage, presign_urls: bool):
        self.storage = storage
        self.presign_urls = presign_urls
        self.jobs = JobStore(storage)
        self.datasets = DatasetStore(storage)
        self._job_owners: dict[str, str | None] = {}  # a job's owner never changes
        self._lock = threading.Lock()

    @staticmethod
    def output_id(prefix: str = "img") -> str:
        """The id of a synchronous request's outputs, tagged with the caller's tenant."""
        tag = owner_tag(caller().owner)
        return new_id(f"{prefix}-{tag}" if tag else prefix)

    def _job_owner(self, job_id: str) -> str | None:
        with self._lock:
            if job_id in self._job_owners:
                return self._job_owners[job_id]
        owner = self.jobs.get(job_id).owner  # JobNotFoundError: nobody's
        with self._lock:
            if len(self._job_owners) >= _OWNER_CACHE_SIZE:
                self._job_owners.clear()
            self._job_owners[job_id] = owner
        return owner

    def readable(self, key: str) -> bool:
        """Whether the caller may read `key` (an output or a dataset image)."""
        who = caller()
        if who.admin:
            return True
        try:
            if key.startswith(OUTPUTS_PREFIX):
                made_by = output_owner(key)
                if made_by is None:
                    return False
                kind, value = made_by
                if kind == "tag":
                    return who.owner is not None and value == owner_tag(who.owner)
                return who.sees(self._job_owner(value))
            if is_dataset_image_key(key):
                owner, public = self.datasets.owner_of(key.split("/")[1])
                return who.sees(owner, public)
        except (JobNotFoundError, DatasetNotFoundError, ValueError):
            return False
        return False

    def url_for(self, key: str, base_url: str) -> str:
        """Where a client fetches `key`: a presigned S3 URL when storage is S3, else GET /v1/files/{key}."""
        if self.presign_urls and self.storage.protocol != "file":
            signed = self.storage.presign(key)
            if signed:
                return signed
        return f"{base_url.rstrip('/')}/v1/files/{key}"

    def open(self, key: str) -> FileStream:
        """Outputs and dataset images the caller may read; anything else, or a missing file, is a 404."""
        if not (key.startswith(SERVED_PREFIXES) or is_dataset_image_key(key)) or not self.readable(key):
            raise NotFoundError(f"no file {key!r}", "key")
        try:
            if self.presign_urls and self.storage.protocol != "file":
                if not self.storage.exists(key):
                    raise ObjectNotFoundError(key)
                return FileStream(redirect=self.storage.presign(key))
            return FileStream(size=self.storage.size(key), handle=self.storage.open(key))
        except (InvalidKeyError, ObjectNotFoundError, FileNotFoundError):
            raise NotFoundError(f"no file {key!r}", "key") from None
