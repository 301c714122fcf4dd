"""Fine-tuning jobs (OpenAI's fine-tuning shapes): LoRA / DreamBooth runs on Ray Train.

    POST /v1/fine_tuning/jobs               checked now (400 naming the field), then submitted as a Ray job
    GET  /v1/fine_tuning/jobs               newest first (`after`, `limit`)
    GET  /v1/fine_tuning/jobs/{id}          status, progress (step/total, loss), the registered LoRA
    GET  /v1/fine_tuning/jobs/{id}/events   the run's log lines as events (steps with loss, resume, errors)
    POST /v1/fine_tuning/jobs/{id}/cancel   stops the Ray job; a stopped run registers nothing

The ingress submits the same entrypoint ops run by hand (`python -m training.lora --config-json …`)
through Ray's `JobSubmissionClient`, so a run outlives the request and the ingress replica. The
record in storage (`fine_tuning/jobs/<id>.json`) maps the job id to its Ray submission and run;
progress is the run's own `status.json` (training/lora.py), read on every GET.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deployments.api import current_ingress
from deployments.errors import InvalidRequestError, NotFoundError
from storage.fs import ObjectNotFoundError
from storage.keys import new_id

router = APIRouter(tags=["fine-tuning"])

RECORDS_PREFIX = "fine_tuning/jobs/"
CODE_ROOT = str(Path(__file__).resolve().parents[2])  # where this code lives in the replica's environment

# Hyperparameters a request may set (TrainConfig fields); `n_epochs` is OpenAI's name for epochs.
HYPERPARAMETERS = (
    "rank", "alpha", "learning_rate", "text_encoder_learning_rate", "lr_scheduler", "lr_warmup_steps",
    "batch_size", "gradient_accumulation", "epochs", "n_epochs", "max_steps", "resolution", "train_text_encoder",
    "mixed_precision", "gradient_checkpointing", "cache_latents", "max_grad_norm", "num_workers",
    "num_class_images", "prior_loss_weight", "class_inference_steps", "checkpoint_every_steps",
    "validation_every_steps", "validation_seeds", "validation_inference_steps", "min_size", "min_images",
)
# Top-level request fields that are TrainConfig fields of the same name.
TOP_LEVEL = ("dataset_version", "trigger_word", "instance_prompt", "class_prompt", "validation_prompt",
             "new_version", "seed")


class FineTuningConfig(BaseModel):
    """`ingress.fine_tuning` in the app config."""

    enabled: bool = True
    ray_address: str | None = Field(None, description="Ray dashboard URL for job submission; "
                                                       "default: this cluster's dashboard.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields every run starts from "
                                                                       "(workers, CPUs or GPU, resolution...).")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="Ray runtime_env of the training job.")


class FineTuningCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The base image model (GET /v1/models).")
    training_file: str | None = Field(None, description="Dataset id or name (OpenAI's field name).")
    dataset: str | None = Field(None, description="Dataset id or name; the same as training_file.")
    dataset_version: int | None = Field(None, ge=1)
    method: str | dict[str, Any] = Field("lora", description="'lora' or 'dreambooth' (or {\"type\": ...}).")
    suffix: str | None = Field(None, max_length=100, description="The LoRA's registered name.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    trigger_word: str | None = None
    instance_prompt: str | None = None
    class_prompt: str | None = None
    validation_prompt: str | None = None
    new_version: bool = Field(False, description="Register as a new version if the name is taken.")
    seed: int | None = None
    validation_file: str | None = None
    metadata: dict[str, str] | None = None


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    model: str
    created_at: int
    finished_at: int | None = None
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    fine_tuned_model: str | None = Field(None, description="The registered LoRA, name:version.")
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    seed: int
    error: FineTuningError | None = None
    result_files: list[str] = []
    trained_tokens: int | None = None
    estimated_finish: int | None = None
    organization_id: str = "atelier"
    metadata: dict[str, str] | None = None
    # Atelier extras
    run_name: str
    suffix: str
    step: int = 0
    total_steps: int = 0
    progress: float = 0.0
    loss: float | None = None
    state: str | None = Field(None, description="The run's own state (preparing, training, finalizing...).")
    resumed_from_step: int | None = None
    metrics: dict[str, Any] | None = None


class FineTuningJobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJob]
    has_more: bool = False


class FineTuningEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class FineTuningEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEvent]
    has_more: bool = False


# --- submission -----------------------------------------------------------------------------------


def _job_client(ingress):
    from ray.job_submission import JobSubmissionClient

    address = ingress.config.fine_tuning.ray_address
    if address is None:
        from ray._private.worker import get_dashboard_url

        address = f"http://{get_dashboard_url()}"
    return JobSubmissionClient(address)


def build_train_config(ingress, body: FineTuningCreate, info: dict) -> dict:
    """The TrainConfig fields of a request, over the configured defaults; 400 naming the field."""
    from training.config import TrainConfig

    if body.model != info["model"]:
        raise InvalidRequestError(f"unknown model {body.model!r}; fine-tuning trains [{info['model']!r}]", "model")
    if body.training_file and body.dataset and body.training_file != body.dataset:
        raise InvalidRequestError("give the dataset once, as training_file or dataset", "dataset")
    dataset = body.training_file or body.dataset
    if not dataset:
        raise InvalidRequestError("training_file (a dataset id or name) is required", "training_file")
    if body.validation_file is not None:
        raise InvalidRequestError("validation_file is not used; validation images are rendered at "
                                  "hyperparameters.validation_seeds", "validation_file")
    unknown = sorted(set(body.hyperparameters) - set(HYPERPARAMETERS))
    if unknown:
        raise InvalidRequestError(f"unknown hyperparameter {unknown[0]!r}; known: {', '.join(HYPERPARAMETERS)}",
                                  f"hyperparameters.{unknown[0]}")
    hyper = dict(body.hyperparameters)
    if "n_epochs" in hyper:
        hyper["epochs"] = hyper.pop("n_epochs")
    method = body.method if isinstance(body.method, str) else body.method.get("type")
    if method not in ("lora", "dreambooth"):
        raise InvalidRequestError(f"method must be 'lora' or 'dreambooth'; got {method!r}", "method")
    fields = {
        **ingress.config.fine_tuning.defaults, **hyper,
        **{name: getattr(body, name) for name in TOP_LEVEL if getattr(body, name) is not None},
        "name": body.suffix or _default_name(dataset), "base_model": info["source"], "dataset_id": dataset,
        "method": method, "storage_root": ingress.config.storage_root,
        "storage_options": ingress.config.storage_options,
    }
    if "epochs" in hyper and "max_steps" not in hyper:
        fields.pop("max_steps", None)  # an epoch count asked for wins over a default step count
    try:
        return TrainConfig.model_validate(fields).model_dump(mode="json")
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error.get("loc") else None
        raise InvalidRequestError(f"{field}: {error['msg']}", _request_param(field)) from None


def _default_name(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", dataset)[:80] + "-lora"


def _request_param(field: str | None) -> str | None:
    """Where a TrainConfig field came from in the request."""
    if field in (None, "name"):
        return "suffix"
    if field == "dataset_id":
        return "training_file"
    if field == "method" or field in TOP_LEVEL:
        return field
    return f"hyperparameters.{'n_epochs' if field == 'epochs' else field}"


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob, status_code=200)
async def create_fine_tuning_job(body: FineTuningCreate, ingress=Depends(current_ingress)) -> FineTuningJob:
    from training.config import TrainConfig, TrainConfigError
    from training.lora import check_inputs, job_entrypoint

    if not ingress.config.fine_tuning.enabled:
        raise NotFoundError("fine-tuning is disabled in this application", "model")
    config = TrainConfig.model_validate(build_train_config(ingress, body, await ingress.sdxl_info()))
    try:
        plan = await asyncio.to_thread(check_inputs, config)
    except TrainConfigError as exc:
        raise InvalidRequestError(exc.message, _request_param(exc.param)) from None
    config = config.model_copy(update={"run_name": plan.run_name})

    job_id = f"ftjob-{new_id('ft').split('_', 1)[-1]}"
    record = {
        "id": job_id, "created_at": time.time(), "config": config.model_dump(mode="json"),
        "plan": plan.model_dump(mode="json"), "metadata": body.metadata,
    }
    await asyncio.to_thread(ingress.storage.put_json, f"{RECORDS_PREFIX}{job_id}.json", record)
    settings = ingress.config.fine_tuning
    runtime_env = dict(settings.runtime_env)
    env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (CODE_ROOT, os.environ.get("PYTHONPATH")) if p),
                **runtime_env.pop("env_vars", {})}
    entrypoint = job_entrypoint(config).replace("python ", f"{sys.executable} ", 1)

    def submit() -> None:
        _job_client(ingress).submit_job(entrypoint=entrypoint, submission_id=job_id,
                                        runtime_env={**runtime_env, "env_vars": env_vars},
                                        metadata={"atelier": "fine_tuning", "lora": config.name})

    await asyncio.to_thread(submit)
    return await asyncio.to_thread(job_view, ingress, record)


# --- views ------------------------------------------------------------------------------------------

_RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "cancelled"}


def load_record(ingress, job_id: str) -> dict:
    if not re.fullmatch(r"ftjob-[A-Za-z0-9]+", job_id):
        raise NotFoundError(f"no fine-tuning job with id {job_id!r}", "fine_tuning_job_id")
    try:
        return ingress.storage.get_json(f"{RECORDS_PREFIX}{job_id}.json")
    except ObjectNotFoundError:
        raise NotFoundError(f"no fine-tuning job with id {job_id!r}", "fine_tuning_job_id") from None


def job_view(ingress, record: dict) -> FineTuningJob:
    from ray.job_submission import JobStatus

    from training.lora import read_status

    config, plan = record["config"], record["plan"]
    try:
        info = _job_client(ingress).get_job_info(record["id"])
        ray_status, ray_message, end_time = str(info.status.value if isinstance(info.status, JobStatus)
                                                else info.status), info.message, info.end_time
    except Exception as exc:  # the Ray job may be gone (cluster restarted): the run's status still tells
        ray_status, ray_message, end_time = "UNKNOWN", f"Ray job unavailable: {exc}", None
    run = read_status(ingress.storage, config["run_name"])
    status = _RAY_STATUS.get(ray_status, "running")
    if ray_status == "UNKNOWN" and run is not None:
        status = {"succeeded": "succeeded", "failed": "failed"}.get(run.state, "failed")
    if status == "succeeded" and (run is None or not run.lora):
        status = "failed"  # the entrypoint exited 0 without registering: never report a model that is not there
    error = None
    if status == "failed":
        message = (run.error if run and run.error else None) or ray_message or "the training run failed"
        error = FineTuningError(code="training_failed", message=message)
    total = (run.total_steps if run else 0) or plan["total_steps"]
    step = run.step if run else 0
    hyper = {name: config.get(name) for name in HYPERPARAMETERS if name in config}
    return FineTuningJob(
        id=record["id"], model=config["base_model"], created_at=int(record["created_at"]),
        finished_at=int(end_time / 1000) if end_time and status in ("succeeded", "failed", "cancelled") else None,
        status=status, fine_tuned_model=run.lora if run and status == "succeeded" else None,
        training_file=plan["dataset_id"], hyperparameters=hyper,
        method={"type": config["method"], "trigger_word": plan.get("trigger_word")}, seed=config["seed"],
        error=error, metadata=record.get("metadata"), run_name=config["run_name"], suffix=config["name"],
        step=step, total_steps=total, progress=round(100.0 * step / max(total, 1), 2) if status != "succeeded"
        else 100.0, loss=run.loss if run else None, state=run.state if run else None,
        resumed_from_step=run.resumed_from_step if run else None,
    )


@router.get("/v1/fine_tuning/jobs", response_model=FineTuningJobList)
async def list_fine_tuning_jobs(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                                ingress=Depends(current_ingress)) -> FineTuningJobList:
    def page() -> FineTuningJobList:
        records = []
        for key in ingress.storage.list(RECORDS_PREFIX):
            try:
                records.append(ingress.storage.get_json(key))
            except ObjectNotFoundError:
                continue
        records.sort(key=lambda r: r["created_at"], reverse=True)
        if after is not None:
            ids = [r["id"] for r in records]
            records = records[ids.index(after) + 1:] if after in ids else []
        return FineTuningJobList(data=[job_view(ingress, r) for r in records[:limit]],
                                 has_more=len(records) > limit)

    return await asyncio.to_thread(page)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
async def get_fine_tuning_job(job_id: str, ingress=Depends(current_ingress)) -> FineTuningJob:
    return await asyncio.to_thread(lambda: job_view(ingress, load_record(ingress, job_id)))


_STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.eE+-]+|nan)")


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=FineTuningEventList)
async def list_fine_tuning_events(job_id: str, limit: int = Query(100, ge=1, le=1000),
                                  ingress=Depends(current_ingress)) -> FineTuningEventList:
    """The run's log lines (those it prints as `[run] …`, and errors), newest first."""

    def events() -> FineTuningEventList:
        record = load_record(ingress, job_id)
        try:
            logs = _job_client(ingress).get_job_logs(job_id)
        except Exception:
            logs = ""
        out = [FineTuningEvent(id=f"{job_id}-event-0", created_at=int(record["created_at"]),
                               message=f"created fine-tuning job; run {record['config']['run_name']}")]
        marker = f"[{record['config']['run_name']}] "  # the run's own lines, also behind Ray's worker prefix
        for line in logs.splitlines():
            line = line.strip()
            text = line.split(marker, 1)[1] if marker in line else None
            is_error = line.startswith(("Traceback", "RuntimeError", "ValueError")) or '"error"' in line
            if text is None and not is_error:
                continue
            event = FineTuningEvent(id=f"{job_id}-event-{len(out)}", created_at=int(time.time()),
                                    message=text or line, level="error" if is_error else "info")
            if match := _STEP_LINE.search(line):
                event.type = "metrics"
                event.data = {"step": int(match[1]), "total_steps": int(match[2]), "train_loss": float(match[3])}
            out.append(event)
        out.reverse()
        return FineTuningEventList(data=out[:limit], has_more=len(out) > limit)

    return await asyncio.to_thread(events)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
async def cancel_fine_tuning_job(job_id: str, ingress=Depends(current_ingress)) -> FineTuningJob:
    def cancel() -> FineTuningJob:
        record = load_record(ingress, job_id)
        client = _job_client(ingress)
        client.stop_job(job_id)
        deadline = time.monotonic() + 10  # answer with the stopped state when it comes quickly
        while time.monotonic() < deadline and str(client.get_job_status(job_id).value) not in (
                "STOPPED", "SUCCEEDED", "FAILED"):
            time.sleep(0.25)
        return job_view(ingress, record)

    return await asyncio.to_thread(cancel)
