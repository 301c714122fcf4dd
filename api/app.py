"""The Atelier application: typed args in, wired deployments out.

`serve deploy serve_config.yaml` names `api.app:build_app` with these args (`serve run
configs/local.yaml` names `local.app:build_app`, which builds the tiny models first and then
calls this); per-deployment resources (replicas, autoscaling,
CPUs, fractional GPUs) live in the config's `deployments:` section, as Ray Serve intends.

The model sections (`sdxl:`, `svd:`, `upscaler:`, `llm:`) are not listed here: each model
package under deployments/ declares its own with a `ModelSpec` (deployments/spec.py), and
`AtelierArgs` gets one typed field per spec, named as the spec. `build_app` binds each
section that is present and derives the models' limits once, as `ray.llm`'s builder derives
its model cards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, create_model, model_validator
import ray
from ray import serve
from ray.serve import Application
from ray.serve.task_consumer import task_consumer

from api.config import IngressConfig
from api.ingress import IngressDeployment
from deployments.spec import ModelSpec, discover
from graphs.job_runner import JobQueueConfig, JobRunnerDeployment

_SQLITE_PREFIXES = ("sqla+sqlite:///", "db+sqlite:///", "sqlite:///")

# Every model package that declares a SPEC, by name: the app's model sections, in binding order.
SPECS: dict[str, ModelSpec] = discover()


class _AppArgs(BaseModel):
    """The args besides the model sections (those come from the specs: see AtelierArgs)."""

    storage_root: str = Field("var/storage", description="Local folder or s3://bucket/prefix.")
    storage_options: dict[str, Any] = {}
    queue: JobQueueConfig
    ingress: IngressConfig = Field(
        description="IngressConfig fields besides storage, queue and the model sections: those are filled in.")
    tiny_models_dir: str | None = Field(
        None, description="Where the tiny random-weight models are; local.app:build_app (configs/local.yaml) "
                          "builds them there if missing.")
    base_dir: str | None = Field(None, description="Relative paths resolve against this; default: the cwd.")

    @model_validator(mode="before")
    @classmethod
    def _ingress_takes_the_queue(cls, data: Any) -> Any:
        """IngressConfig requires the queue, which is the app's: hand it over before validating."""
        if isinstance(data, dict) and "queue" in data and not isinstance(data.get("ingress"), BaseModel):
            data = {**data, "ingress": {**(data.get("ingress") or {}), "queue": data["queue"]}}
        return data

    @model_validator(mode="after")
    def _wire(self) -> _AppArgs:
        """Fill the app's storage, queue and model configs into the sections that take them.

        The app's values win over any a section repeats, as they always have.
        """
        storage = {"storage_root": self.storage_root, "storage_options": self.storage_options}
        for name, spec in SPECS.items():
            section = getattr(self, name)
            if section is not None and spec.takes_storage:
                setattr(self, name, section.model_copy(update=storage))
        # IngressConfig may hold a model's config too (today `llm`, for prompt refinement).
        models = {name: getattr(self, name) for name in SPECS if name in IngressConfig.model_fields}
        self.ingress = self.ingress.model_copy(update={**storage, "queue": self.queue, **models})
        return self

    def resolved(self) -> AtelierArgs:
        """Relative local paths made absolute (replicas may not share the cwd).

        Except model folders shipped with the code: when Ray runs the app from a runtime_env
        `working_dir` (and no base_dir is given), every node unpacks its own copy of it, which is
        each replica's cwd. A relative model path then stays relative, so that each replica opens
        its own node's copy rather than the path of the node that built the app.
        """
        base = Path(self.base_dir or os.getcwd())
        shipped = self.base_dir is None and shipped_working_dir() is not None
        args = self.model_copy(deep=True)
        if "://" not in args.storage_root:
            args.storage_root = str((base / args.storage_root).resolve())
        if args.tiny_models_dir:
            args.tiny_models_dir = str((base / args.tiny_models_dir).resolve())
        for name, spec in SPECS.items():
            section = getattr(args, name)
            model = getattr(section, spec.model_field, None) if section is not None else None
            if model and not Path(model).is_absolute() and shipped:
                continue
            if model and (base / model).exists():  # else a hub id, e.g. stabilityai/stable-diffusion-xl-base-1.0
                setattr(args, name, section.model_copy(update={spec.model_field: str((base / model).resolve())}))
        for field in ("broker_url", "backend_url"):
            setattr(args.queue, field, _absolute_sqlite(getattr(args.queue, field), base))
        return args._wire()


def _model_field(spec: ModelSpec) -> tuple[Any, Any]:
    kind = f"{spec.config_cls.__name__} fields"
    storage = "; storage is filled in from above" if spec.takes_storage else ""
    if spec.required:
        return spec.config_cls, Field(description=f"{kind}{storage}.")
    return spec.config_cls | None, Field(None, description=f"{kind}{storage}; leave out to deploy no {spec.name}.")


AtelierArgs = create_model(
    "AtelierArgs",
    __base__=_AppArgs,
    __module__=__name__,
    __doc__="The app's args: storage, queue, ingress, and one typed section per model spec (`sdxl`, `svd`, ...).",
    **{name: _model_field(spec) for name, spec in SPECS.items()},
)


def shipped_working_dir() -> str | None:
    """The runtime_env `working_dir` Ray runs this process from (a URI or a path), or None."""
    try:
        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().runtime_env.get("working_dir") or None
    except Exception:  # noqa: BLE001 - no Ray context: not shipped
        return None


def _absolute_sqlite(url: str, base: Path) -> str:
    for prefix in _SQLITE_PREFIXES:
        if url.startswith(prefix):
            path = url[len(prefix):]
            if not path.startswith("/"):
                path = str((base / path).resolve())
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return prefix + path
    return url


def model_limits(args: _AppArgs) -> dict[str, BaseModel]:
    """Each deployed model's typed limits, derived from its config once, when the app is built."""
    return {name: spec.limits_cls.from_config(getattr(args, name)) for name, spec in SPECS.items()
            if spec.limits_cls is not None and getattr(args, name) is not None}


def build_app(args: AtelierArgs | dict) -> Application:
    args = AtelierArgs.model_validate(args).resolved()
    storage = {"storage_root": args.storage_root, "storage_options": args.storage_options}

    # Every spec's handle by name, None where its section is left out (the ingress and the job
    # runner take them all as keywords).
    models = {name: spec.bind(getattr(args, name)) if getattr(args, name) is not None else None
              for name, spec in SPECS.items()}
    job_runner_cls = serve.deployment(
        task_consumer(task_processor_config=args.queue.task_processor_config())(JobRunnerDeployment),
        name="JobRunnerDeployment",
        max_ongoing_requests=args.queue.concurrency,  # Serve sizes the consumer's thread pool with this
        graceful_shutdown_timeout_s=args.queue.drain_s + 15,  # a stopping runner lets its jobs finish
    )
    job_runner = job_runner_cls.bind(args.queue, **models, **storage, retention=args.ingress.assets.retention,
                                     assets_index_dir=args.ingress.assets.index_dir)
    return IngressDeployment.bind(args.ingress, job_runner=job_runner, limits=model_limits(args), **models)
