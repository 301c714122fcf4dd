"""The ingress's config: the `ingress:` section of the app's args, with storage and queue filled in."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

from api.auth import AuthConfig
from api.fine_tuning.service import FineTuningConfig
from api.models.service import DEFAULT_MAX_LORA_IMPORT_BYTES
from api.ratelimit import RateLimitConfig
from api.security import DEFAULT_ALLOWED_HOSTS, DEFAULT_CSP
from deployments.llm.contract import GemmaConfig
from deployments.llm.vision import ModerationSettings
from graphs.job_runner import JobQueueConfig
from storage.assets import AssetsConfig
from storage.sources import CollectConfig
from storage.url_import import DatasetImportConfig


class IngressConfig(BaseModel):
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    queue: JobQueueConfig
    max_upload_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_upload_pixels: int = Field(4096 * 4096, gt=0)
    max_lora_import_bytes: int = Field(
        DEFAULT_MAX_LORA_IMPORT_BYTES, gt=0, description="The largest LoRA file POST /v1/models imports (SDXL LoRAs are "
                                          "commonly 100-400 MB); past it a 413 naming `file`. It replaces "
                                          "max_upload_bytes for that route.")
    presign_urls: bool = Field(True, description="With S3 storage, output URLs are presigned S3 URLs.")
    sse_poll_s: float = 0.25
    readiness_timeout_s: float = Field(5.0, gt=0)
    dataset_import: DatasetImportConfig = Field(
        DatasetImportConfig(), description="URL/prefix import limits and the private-host allow-list.")
    collect: CollectConfig = Field(
        default_factory=CollectConfig,
        description="Unsplash and Pexels for POST /v1/collect/search: base URLs, download hosts, the environment "
                    "variables holding the keys (UNSPLASH_ACCESS_KEY, PEXELS_API_KEY by default).")
    llm: GemmaConfig | None = Field(None, description="The deployed Gemma, if any (filled in by the app builder).")
    auth: AuthConfig = Field(AuthConfig(), description="API keys (SHA-256 hashes), their scopes, and the mode.")
    moderation: ModerationSettings = Field(
        ModerationSettings(), description="The language model checks each prompt before any generation, and "
                                          "each generated image before it is stored, against these policy "
                                          "categories; a refusal is a 400 with code content_policy_violation. "
                                          "Off by default; needs the `llm` section.")
    max_workflow_nodes: int = Field(200, ge=1, le=500, description="Nodes a user workflow may have.")
    max_workflow_images: int = Field(64, ge=1, le=10_000, description="Images (and video frames) one workflow run may "
                                                                     "ask for, over all its model nodes.")
    max_best_of: int = Field(8, ge=1, le=64, description="The most candidates `best_of` may ask for (images API and "
                                                         "the text_to_image node); each is generated and judged.")
    max_qa_rounds: int = Field(5, ge=1, le=50, description="The most rounds a qa_loop node may run (generate, judge, "
                                                           "refine the prompt).")
    rate_limits: RateLimitConfig = Field(RateLimitConfig(), description="Per-key request and cost budgets (429 + "
                                                                       "Retry-After past them) and active-job caps.")
    sse_max_lifetime_s: float = Field(600.0, gt=0, description="An event stream ends after this long; clients "
                                                               "reconnect (EventSource does by itself).")
    sse_max_per_key: int = Field(8, ge=1, description="Open event streams per API key, per ingress replica.")
    assets: AssetsConfig = Field(
        default_factory=AssetsConfig, description="The asset library: its local search index, and the retention "
                                                  "policy per job kind (swept by the job runners).")
    fine_tuning: FineTuningConfig = Field(
        FineTuningConfig(), description="POST /v1/fine_tuning/jobs: Ray job address and run defaults.")
    allowed_hosts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HOSTS), min_length=1,
        description="Host header values the ingress answers (Starlette's TrustedHostMiddleware; the port is "
                    "ignored; '*.example.com' matches subdomains, '*' any host). Anything else is a 400, which "
                    "stops DNS rebinding. The default is loopback only; a deployment behind a load balancer "
                    "lists its names (or '*').")
    cors_origins: list[str] = Field(
        [], description="Origins (scheme://host[:port]) whose pages may call the API from a browser (CORS). "
                        "Empty (the default): CORS is off and only this server's own pages can.")
    content_security_policy: str = Field(
        DEFAULT_CSP, min_length=1,
        description="The Content-Security-Policy on every response (FastAPI's /docs pages get one that lets "
                    "Swagger UI load). Add an http: S3 endpoint to img-src/media-src if presigned output URLs "
                    "are not https.")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if "*" in host[1:] or (host.startswith("*") and host != "*" and not host.startswith("*.")):
                raise ValueError(f"{host!r}: a wildcard host must be '*' or look like '*.example.com'")
        return hosts

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*" or not origin.startswith(("http://", "https://")) or origin.count("/") != 2:
                raise ValueError(f"{origin!r}: a CORS origin is scheme://host[:port], with no path and no '*'")
        return origins
