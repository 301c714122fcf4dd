"""Output files: their URLs (served here, or presigned S3 URLs) and reading them back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO

from deployments.errors import NotFoundError
from storage.datasets import is_dataset_image_key
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage

SERVED_PREFIXES = ("outputs/",)


@dataclass
class FileStream:
    """A file to stream (`handle`, `size`), or where to find it (`redirect`: a presigned URL)."""

    size: int = 0
    handle: IO[bytes] | None = None
    redirect: str | None = None


class FilesService:
    def __init__(self, storage: Storage, presign_urls: bool):
        self.storage = storage
        self.presign_urls = presign_urls

    def url_for(self, key: str, base_url: str) -> str:
        """Where a client fetches `key`: a presigned S3 URL when storage is S3, else GET /v1/files/{key}."""
        if self.presign_urls and self.storage.protocol != "file":
            signed = self.storage.presign(key)
            if signed:
                return signed
        return f"{base_url.rstrip('/')}/v1/files/{key}"

    def open(self, key: str) -> FileStream:
        """Outputs and dataset images only; anything else, or a missing file, is a 404."""
        if not (key.startswith(SERVED_PREFIXES) or is_dataset_image_key(key)):
            raise NotFoundError(f"no file {key!r}", "key")
        try:
            if self.presign_urls and self.storage.protocol != "file":
                if not self.storage.exists(key):
                    raise ObjectNotFoundError(key)
                return FileStream(redirect=self.storage.presign(key))
            return FileStream(size=self.storage.size(key), handle=self.storage.open(key))
        except (InvalidKeyError, ObjectNotFoundError, FileNotFoundError):
            raise NotFoundError(f"no file {key!r}", "key") from None
