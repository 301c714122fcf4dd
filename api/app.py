"""The Atelier application: typed args in, wired deployments out.

`serve run configs/local.yaml` and `serve deploy serve_config.yaml` both name
`api.app:build_app` with these args; per-deployment resources (replicas, autoscaling,
CPUs, fractional GPUs) live in the config's `deployments:` section, as Ray Serve intends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application
from ray.serve.task_consumer import task_consumer

from deployments.llm.contract import GemmaConfig, build_gemma_deployment
from api.ingress import IngressConfig, IngressDeployment
from graphs.job_runner import JobQueueConfig, JobRunnerDeployment
from deployments.sdxl.deployment import SDXLConfig, SDXLDeployment
from deployments.svd.deployment import SVDConfig, SVDDeployment
from deployments.upscaler.deployment import UpscalerConfig, UpscalerDeployment

_SQLITE_PREFIXES = ("sqla+sqlite:///", "db+sqlite:///", "sqlite:///")


class AtelierArgs(BaseModel):
    storage_root: str = Field("var/storage", description="Local folder or s3://bucket/prefix.")
    storage_options: dict[str, Any] = {}
    queue: JobQueueConfig
    sdxl: dict[str, Any] = Field(description="SDXLConfig fields; storage is filled in from above.")
    svd: dict[str, Any] | None = Field(None, description="SVDConfig fields; leave out to deploy no video model.")
    upscaler: dict[str, Any] | None = Field(None, description="UpscalerConfig fields; leave out for no upscaler.")
    llm: dict[str, Any] | None = Field(
        None, description="GemmaConfig fields (vLLM via ray.serve.llm); leave out to deploy no language model.")
    ingress: dict[str, Any] = Field({}, description="IngressConfig fields besides storage and queue.")
    tiny_models_dir: str | None = Field(
        None, description="Build the tiny random-weight models here if missing (local default and tests).")
    base_dir: str | None = Field(None, description="Relative paths resolve against this; default: the cwd.")

    def resolved(self) -> "AtelierArgs":
        """Relative local paths made absolute (replicas may not share the cwd); tiny models built if asked."""
        base = Path(self.base_dir or os.getcwd())
        args = self.model_copy(deep=True)
        if "://" not in args.storage_root:
            args.storage_root = str((base / args.storage_root).resolve())
        if args.tiny_models_dir:
            args.tiny_models_dir = str((base / args.tiny_models_dir).resolve())
            from local.tiny_models import ensure_tiny_models

            ensure_tiny_models(args.tiny_models_dir)
        sections = ((args.sdxl, "model"), (args.svd or {}, "model"), (args.upscaler or {}, "model"),
                    (args.llm or {}, "model_source"))
        for section, field in sections:
            model = section.get(field)
            if model and (base / model).exists():  # else a hub id, e.g. stabilityai/stable-diffusion-xl-base-1.0
                section[field] = str((base / model).resolve())
        for name in ("broker_url", "backend_url"):
            setattr(args.queue, name, _absolute_sqlite(getattr(args.queue, name), base))
        return args


def _absolute_sqlite(url: str, base: Path) -> str:
    for prefix in _SQLITE_PREFIXES:
        if url.startswith(prefix):
            path = url[len(prefix):]
            if not path.startswith("/"):
                path = str((base / path).resolve())
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return prefix + path
    return url


def build_app(args: AtelierArgs | dict) -> Application:
    args = AtelierArgs.model_validate(args).resolved()
    storage = {"storage_root": args.storage_root, "storage_options": args.storage_options}

    sdxl = SDXLDeployment.bind(SDXLConfig.model_validate({**args.sdxl, **storage}))
    svd = SVDDeployment.bind(SVDConfig.model_validate({**args.svd, **storage})) if args.svd else None
    upscaler = (UpscalerDeployment.bind(UpscalerConfig.model_validate({**args.upscaler, **storage}))
                if args.upscaler else None)
    llm_config = GemmaConfig.model_validate(args.llm) if args.llm is not None else None
    llm = build_gemma_deployment(llm_config) if llm_config else None
    job_runner_cls = serve.deployment(
        task_consumer(task_processor_config=args.queue.task_processor_config())(JobRunnerDeployment),
        name="JobRunnerDeployment",
        max_ongoing_requests=args.queue.concurrency,  # Serve sizes the consumer's thread pool with this
    )
    models = {"sdxl": sdxl, "svd": svd, "upscaler": upscaler, "llm": llm}
    job_runner = job_runner_cls.bind(args.queue, **models, **storage)
    ingress_config = IngressConfig.model_validate(
        {**args.ingress, **storage, "queue": args.queue, "llm": llm_config})
    return IngressDeployment.bind(ingress_config, job_runner=job_runner, **models)
