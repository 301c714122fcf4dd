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

One run folder (`training/<run_name>/`: checkpoints, status) belongs to one job at a time. A
submission claims its run name by creating `fine_tuning/runs/<run_name>/<generation>.json` only
if nothing is there (create-if-absent, as the LoRA registry claims versions); the next claim of
the name takes the next generation, once the job holding the latest one is no longer queued or
running. So two submissions of one suffix cannot both train into the same folder: the second is
refused (409), or with `new_version` takes the next free run name.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api import current_ingress
from deployments.errors import ConflictError, InvalidRequestError, NotFoundError, OverloadedError
from storage.fs import ObjectNotFoundError
from storage.keys import new_id

router = APIRouter(tags=["fine-tuning"])

RECORDS_PREFIX = "fine_tuning/jobs/"
CLAIMS_PREFIX = "fine_tuning/runs/"
ACTIVE_STATUSES = ("validating_files", "queued", "running")
MAX_CLAIM_ATTEMPTS = 20
# A job Ray does not know (yet) with no run status: queued while its submission may still be under
# way, failed after. A run whose Ray job cannot be asked counts as running while its status is fresh.
SUBMIT_GRACE_S = 60.0
RUN_STALE_S = 300.0
SUBMIT_RETRY_AFTER_S = 10
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


class FineTuningLimits(BaseModel):
    """Ceilings on what a request may ask for (the configured defaults are held to them too)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(100_000, ge=1, description="Optimizer steps, also as epochs x steps per epoch.")
    epochs: int = Field(1_000, ge=1)
    rank: int = Field(256, ge=1)
    resolution: int = Field(2048, ge=64)
    num_workers: int | None = Field(None, ge=1, description="Default: as many as the cluster's nodes hold "
                                                            "(CPUs per worker, a GPU each), checked at submission.")


class FineTuningConfig(BaseModel):
    """`ingress.fine_tuning` in the app config."""

    enabled: bool = True
    ray_address: str | None = Field(None, description="Ray dashboard URL for job submission; "
                                                       "default: this cluster's dashboard.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields every run starts from "
                                                                       "(workers, CPUs or GPU, resolution...). "
                                                                       "Its min_images is a floor: a request may "
                                                                       "ask for more images, not fewer.")
    limits: FineTuningLimits = Field(FineTuningLimits(), description="Ceilings on a request's hyperparameters.")
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
        config = TrainConfig.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = str(error["loc"][0]) if error.get("loc") else None
        raise InvalidRequestError(f"{field}: {error['msg']}", _request_param(field)) from None

    # The configured minimum of images is a floor, so a client cannot train on less than the operator allows.
    settings = ingress.config.fine_tuning
    floor = settings.defaults.get("min_images", TrainConfig.model_fields["min_images"].default)
    if config.min_images < floor:
        raise InvalidRequestError(f"min_images: at least {floor} images are required here; got {config.min_images}",
                                  _request_param("min_images"))
    for field, limit in settings.limits.model_dump(exclude={"num_workers"}).items():
        value = getattr(config, field)
        if value is not None and value > limit:
            raise InvalidRequestError(f"{field}: at most {limit} here; got {value}", _request_param(field))
    return config.model_dump(mode="json")


def check_length(ingress, config, plan) -> None:
    """An epoch count is held to the step limit too, once the plan knows the steps per epoch."""
    limit = ingress.config.fine_tuning.limits.max_steps
    if plan.total_steps > limit:
        field = "max_steps" if config.max_steps else "epochs"
        raise InvalidRequestError(f"{field}: {plan.total_steps} optimizer steps ({plan.steps_per_epoch} per epoch), "
                                  f"over the limit of {limit}", _request_param(field))


def _cluster_nodes() -> list[dict[str, float]] | None:
    """The resources of each live node of this Ray cluster; None when not running on Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _fits(available: float, each: float) -> int:
    # Ray counts resources in 1/10000 units: 1.0 CPU holds five 0.2-CPU workers (1.0 // 0.2 == 4.0 in floats).
    return int(round(available * 10_000)) // max(1, int(round(each * 10_000)))


def check_capacity(ingress, config) -> None:
    """num_workers within the configured maximum, or what the cluster's nodes can hold at all: a
    worker group bigger than the cluster waits for resources forever instead of failing."""
    limit = ingress.config.fine_tuning.limits.num_workers
    param = _request_param("num_workers")
    if limit is not None:
        if config.num_workers > limit:
            raise InvalidRequestError(f"num_workers: at most {limit} here; got {config.num_workers}", param)
        return
    nodes = _cluster_nodes()
    if nodes is None:
        return
    fit = 0
    for resources in nodes:
        per_node = _fits(resources.get("CPU", 0.0), config.cpus_per_worker)
        if config.use_gpu:
            per_node = min(per_node, int(resources.get("GPU", 0.0)))
        fit += per_node
    if config.num_workers > fit:
        each = f"{config.cpus_per_worker:g} CPU{' and 1 GPU' if config.use_gpu else ''}"
        raise InvalidRequestError(f"num_workers: this cluster holds at most {fit} workers of {each} each; "
                                  f"got {config.num_workers}", param)


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

    # 1. Check inputs: fields, the cluster, then storage (dataset, base model, name, a checkpoint to resume).
    if not ingress.config.fine_tuning.enabled:
        raise NotFoundError("fine-tuning is disabled in this application", "model")
    config = TrainConfig.model_validate(build_train_config(ingress, body, await ingress.sdxl_info()))
    await asyncio.to_thread(check_capacity, ingress, config)
    try:
        plan = await asyncio.to_thread(check_inputs, config)
    except TrainConfigError as exc:
        raise InvalidRequestError(exc.message, _request_param(exc.param)) from None
    check_length(ingress, config, plan)

    # 2. Claim the run folder, so no other job trains into it meanwhile.
    job_id = f"ftjob-{new_id('ft').split('_', 1)[-1]}"
    plan = await asyncio.to_thread(claim_run, ingress, config, plan, job_id)
    config = config.model_copy(update={"run_name": plan.run_name})

    # 3. The durable record, then the Ray job.
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
        try:
            _job_client(ingress).submit_job(entrypoint=entrypoint, submission_id=job_id,
                                            runtime_env={**runtime_env, "env_vars": env_vars},
                                            metadata={"atelier": "fine_tuning", "lora": config.name})
        except Exception as exc:
            if _ray_has_job(ingress, job_id):
                return  # accepted, though the answer was lost (a timeout after the POST)
            reason = f"the Ray job could not be submitted: {type(exc).__name__}: {exc}"[:2000]
            # The record says so (the run name is free again), and the client may retry.
            ingress.storage.put_json(f"{RECORDS_PREFIX}{job_id}.json", {**record, "submit_error": reason})
            raise OverloadedError(f"fine-tuning job {job_id} failed: {reason}", None,
                                  retry_after=SUBMIT_RETRY_AFTER_S) from None

    await asyncio.to_thread(submit)
    return await asyncio.to_thread(job_view, ingress, record)


def _ray_has_job(ingress, job_id: str) -> bool:
    try:
        _job_client(ingress).get_job_info(job_id)
        return True
    except Exception:
        return False


# --- run claims -------------------------------------------------------------------------------------


def _claim_key(run_name: str, generation: int) -> str:
    return f"{CLAIMS_PREFIX}{run_name}/{generation:08d}.json"


def _latest_claim(storage, run_name: str) -> tuple[int, dict | None]:
    """``(generation, claim)`` of the newest claim of a run name; ``(0, None)`` if it was never claimed."""
    prefix = f"{CLAIMS_PREFIX}{run_name}/"
    generations = sorted(int(m[1]) for key in storage.list(prefix)
                         if (m := re.fullmatch(r"(\d+)\.json", key[len(prefix):])))
    if not generations:
        return 0, None
    try:
        return generations[-1], storage.get_json(_claim_key(run_name, generations[-1]))
    except (ObjectNotFoundError, ValueError):
        return generations[-1], {}


def _claim_holder(ingress, claim: dict) -> str | None:
    """The id of the job holding a claim while it is queued or running; None once it is finished."""
    job_id = claim.get("job_id")
    try:
        record = load_record(ingress, str(job_id))
    except NotFoundError:  # claimed, and its record is not written yet (or never will be)
        young = time.time() - float(claim.get("claimed_at") or 0) < SUBMIT_GRACE_S
        return str(job_id) if young else None
    return job_id if job_view(ingress, record).status in ACTIVE_STATUSES else None


def _run_name_candidates(name: str, first: str, new_version: bool):
    yield first
    if not new_version:
        return
    match = re.fullmatch(re.escape(name) + r"-v(\d+)", first)
    version = int(match[1]) + 1 if match else 2
    for _ in range(MAX_CLAIM_ATTEMPTS):
        yield f"{name}-v{version}"
        version += 1


def claim_run(ingress, config, plan, job_id: str):
    """The plan, with the run name this job now holds. 409 naming ``suffix`` while another job
    trains that name; with ``new_version``, the next run name that no job holds (and whose
    checkpoint, if any, this config may resume) is taken instead."""
    from training.config import TrainConfigError
    from training.lora import check_resume, resume_record

    claim = json.dumps({"job_id": job_id, "claimed_at": time.time()}).encode()
    holders = []
    for run_name in _run_name_candidates(config.name, plan.run_name, config.new_version):
        if run_name != plan.run_name:
            try:
                check_resume(ingress.storage, run_name, resume_record(config, plan))
            except TrainConfigError:
                continue  # a run of this name trained differently: not ours to resume
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            generation, latest = _latest_claim(ingress.storage, run_name)
            holder = _claim_holder(ingress, latest) if latest is not None else None
            if holder is not None:
                holders.append(holder)
                break
            # create-if-absent: of two submissions that both saw the name free, one gets it
            if ingress.storage.put_if_absent(_claim_key(run_name, generation + 1), claim, "application/json"):
                return plan.model_copy(update={"run_name": run_name})
    holder = f" (job {holders[0]})" if holders else ""
    hint = "" if config.new_version else ", or set new_version to train another version alongside it"
    raise ConflictError(f"a fine-tuning job for {config.name!r} is queued or running{holder}; wait for it to "
                        f"finish or cancel it{hint}", "suffix")


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
    ray_missing = False
    if record.get("submit_error"):
        ray_status, ray_message, end_time = "NOT_SUBMITTED", record["submit_error"], None
    else:
        try:
            info = _job_client(ingress).get_job_info(record["id"])
            ray_status, ray_message, end_time = str(info.status.value if isinstance(info.status, JobStatus)
                                                    else info.status), info.message, info.end_time
        except Exception as exc:  # gone (cluster restarted), not submitted yet, or Ray cannot be asked
            ray_missing = "status code 404" in str(exc)
            ray_status, ray_message, end_time = "UNKNOWN", f"Ray job unavailable: {exc}", None
    run = read_status(ingress.storage, config["run_name"])
    now = time.time()
    if ray_status in _RAY_STATUS:
        status = _RAY_STATUS[ray_status]
    elif ray_status == "NOT_SUBMITTED":
        status = "failed"
    elif run is not None and run.state in ("succeeded", "failed"):
        status = run.state  # the run's own last word
    elif run is not None and not ray_missing and now - (run.updated_at or run.started_at or 0) < RUN_STALE_S:
        status = "running"  # Ray cannot be asked right now, and the run reports progress
    elif run is None and now - record["created_at"] < SUBMIT_GRACE_S:
        status = "queued"  # the submission may still be under way
    else:
        status = "failed"  # Ray does not know the job and the run is silent: it is not coming back
        if ray_missing:
            ray_message = "the Ray job is gone (was the cluster restarted?) and the run stopped reporting"
    if status == "succeeded" and (run is None or not run.lora):
        status = "failed"  # the entrypoint exited 0 without registering: never report a model that is not there
    error = None
    if status == "failed":
        if ray_status == "NOT_SUBMITTED":
            error = FineTuningError(code="submission_failed", message=ray_message)
        else:
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
        else 100.0, loss=run.loss if run and run.loss is not None and math.isfinite(run.loss) else None, state=run.state if run else None,
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
