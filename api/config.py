"""The ingress's config: the `ingress:` section of the app's args, with storage and queue filled in."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from api.auth import AuthConfig
from api.fine_tuning.service import FineTuningConfig
from deployments.llm.contract import GemmaConfig
from graphs.job_runner import JobQueueConfig
from storage.url_import import DatasetImportConfig


class IngressConfig(BaseModel):
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    queue: JobQueueConfig
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_upload_pixels: int = Field(4096 * 4096, gt=0)
    presign_urls: bool = Field(True, description="With S3 storage, output URLs are presigned S3 URLs.")
    sse_poll_s: float = 0.25
    readiness_timeout_s: float = Field(5.0, gt=0)
    dataset_import: DatasetImportConfig = Field(
        DatasetImportConfig(), description="URL/prefix import limits and the private-host allow-list.")
    llm: GemmaConfig | None = Field(None, description="The deployed Gemma, if any (filled in by the app builder).")
    auth: AuthConfig = Field(AuthConfig(), description="API keys (SHA-256 hashes), their scopes, and the mode.")
    max_workflow_nodes: int = Field(200, ge=1, le=500, description="Nodes a user workflow may have.")
    fine_tuning: FineTuningConfig = Field(
        FineTuningConfig(), description="POST /v1/fine_tuning/jobs: Ray job address and run defaults.")
