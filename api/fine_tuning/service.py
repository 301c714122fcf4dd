"""Fine-tuning jobs: LoRA / DreamBooth runs on Ray Train, submitted as Ray jobs.

The service submits the same entrypoint ops run by hand (`python -m training.cli --config-json …`)
through Ray's `JobSubmissionClient`, so a run outlives the request and the ingress replica. The
record in storage (storage/fine_tuning.py) maps the job id to its Ray submission and run;
progress is the run's own `status.json` (training/plan.py), read on every GET, reconciled here
with what Ray says of the job.

One run folder (`training/<run_name>/`: checkpoints, status) belongs to one job at a time. A
submission claims its run name (FineTuningStore.claim, create-if-absent); the next claim of the
name takes the next generation, once the job holding the latest one is no longer queued or
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
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import quote

import ray
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray._private.worker import get_dashboard_url
from ray.job_submission import JobStatus, JobSubmissionClient

from api.auth import caller
from api.fine_tuning.protocol import (
    FineTuningCreate,
    FineTuningError,
    FineTuningEvent,
    FineTuningEventList,
    FineTuningJob,
    FineTuningJobList,
    FineTuningValidationImage,
)
from deployments.errors import ConflictError, InvalidRequestError, NotFoundError, OverloadedError
from deployments.sdxl.contract import SDXLLimits
from storage.datasets import DatasetNotFoundError, DatasetStore
from storage.fine_tuning import MAX_CLAIM_ATTEMPTS, FineTuningJobNotFoundError, FineTuningStore
from storage.fs import ObjectNotFoundError, Storage
from storage.keys import new_id
from storage.registry import LoraRegistry, LoraRegistryError
from training.config import STORAGE_OPTIONS_ENV, TrainConfig, TrainConfigError
from training.plan import (TrainPlan, check_inputs, check_resume, job_entrypoint, read_status, resume_record,
                           run_prefix)

ACTIVE_STATUSES = ("validating_files", "queued", "running")
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
             "new_version", "public", "seed")

_RAY_STATUS = {"PENDING": "queued", "RUNNING": "running", "SUCCEEDED": "succeeded", "FAILED": "failed",
               "STOPPED": "cancelled"}
# training/loop.py's line per step: "step 3/8 loss 0.1234 lr 1.00e-03 epoch 2/4 1.52 samples/s" (older runs: no epoch)
_STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([0-9.eE+-]+|nan)(?: lr ([0-9.eE+-]+))?(?: epoch (\d+)/(\d+))?"
                        r"(?: ([0-9.eE+-]+) samples/s)?")
# A run's files the API serves (GET /v1/fine_tuning/jobs/{id}/files?name=): its validation images.
_RESULT_FILE = re.compile(r"validation/step-\d{6,}/seed-\d+\.png")


class FineTuningLimits(BaseModel):
    """Ceilings on what a request may ask for (the configured defaults are held to them too)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(100_000, ge=1, description="Optimizer steps, also as epochs x steps per epoch.")
    epochs: int = Field(1_000, ge=1)
    rank: int = Field(256, ge=1)
    resolution: int = Field(2048, ge=64)
    num_workers: int | None = Field(None, ge=1, description="Default: as many as the cluster's nodes hold "
                                                            "(CPUs per worker, a GPU each), checked at submission.")
    # What a run renders besides training: DreamBooth class images, and validation images.
    num_class_images: int = Field(200, ge=1, description="dreambooth: class images a run generates.")
    class_inference_steps: int = Field(50, ge=1, description="dreambooth: denoising steps per class image.")
    validation_images: int = Field(8, ge=1, description="Validation images per render (validation_seeds).")
    validation_inference_steps: int = Field(50, ge=1, description="Denoising steps per validation image.")
    validation_renders: int = Field(20, ge=1, description="Validation renders a run makes: one every "
                                                          "validation_every_steps, and the final one.")
    checkpoints: int = Field(100, ge=1, description="Checkpoints a run uploads: one every "
                                                    "checkpoint_every_steps, and the last step.")


# Limits that are a ceiling on the TrainConfig field of the same name (dreambooth's only with dreambooth).
_FIELD_LIMITS = ("max_steps", "epochs", "rank", "resolution", "validation_inference_steps")
_DREAMBOOTH_LIMITS = ("num_class_images", "class_inference_steps")


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


class JobClient(Protocol):
    """What the service uses of Ray's JobSubmissionClient."""

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict) -> str: ...

    def get_job_info(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...

    def get_job_status(self, job_id: str) -> Any: ...

    def stop_job(self, job_id: str) -> bool: ...


def ray_job_client(address: str | None) -> JobSubmissionClient:
    """A client of the Ray dashboard at `address` (default: this cluster's)."""
    return JobSubmissionClient(address if address is not None else f"http://{get_dashboard_url()}")


def cluster_nodes() -> list[dict[str, float]] | None:
    """The resources of each live node of this Ray cluster; None when not running on Ray."""
    if not ray.is_initialized():
        return None
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def _fits(available: float, each: float) -> int:
    # Ray counts resources in 1/10000 units: 1.0 CPU holds five 0.2-CPU workers (1.0 // 0.2 == 4.0 in floats).
    return int(round(available * 10_000)) // max(1, int(round(each * 10_000)))


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None  # a JSON answer holds no NaN


def _default_name(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", dataset)[:80] + "-lora"


def request_param(field: str | None) -> str | None:
    """Where a TrainConfig field came from in the request."""
    if field in (None, "name"):
        return "suffix"
    if field == "dataset_id":
        return "training_file"
    if field == "method" or field in TOP_LEVEL:
        return field
    return f"hyperparameters.{'n_epochs' if field == 'epochs' else field}"


def _run_name_candidates(name: str, first: str, new_version: bool) -> Iterator[str]:
    yield first
    if not new_version:
        return
    match = re.fullmatch(re.escape(name) + r"-v(\d+)", first)
    version = int(match[1]) + 1 if match else 2
    for _ in range(MAX_CLAIM_ATTEMPTS):
        yield f"{name}-v{version}"
        version += 1


class FineTuningService:
    def __init__(self, store: FineTuningStore, storage: Storage, config: FineTuningConfig, base: SDXLLimits,
                 storage_root: str, storage_options: dict[str, Any],
                 job_client: Callable[[], JobClient] | None = None,
                 nodes: Callable[[], list[dict[str, float]] | None] = cluster_nodes):
        self.store = store  # job records and run-name claims
        self.storage = storage  # the runs' folders (status, checkpoints), as training/plan.py reads them
        self.config = config
        self.base = base  # the base model fine-tuning trains (SDXL's name and source)
        self.storage_root = storage_root  # what the training job's storage is (it builds its own)
        self.storage_options = storage_options
        self.job_client = job_client or (lambda: ray_job_client(config.ray_address))
        self.nodes = nodes

    # --- checks -----------------------------------------------------------------------------------

    def train_fields(self, body: FineTuningCreate) -> dict:
        """The TrainConfig fields of a request, over the configured defaults; 400 naming the field."""
        if body.model != self.base.model:
            raise InvalidRequestError(f"unknown model {body.model!r}; fine-tuning trains [{self.base.model!r}]",
                                      "model")
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
            **self.config.defaults, **hyper,
            **{name: getattr(body, name) for name in TOP_LEVEL if getattr(body, name) is not None},
            "name": body.suffix or _default_name(dataset), "base_model": self.base.source, "dataset_id": dataset,
            "method": method, "storage_root": self.storage_root, "storage_options": self.storage_options,
            "owner": caller().owner,
        }
        if "epochs" in hyper and "max_steps" not in hyper:
            fields.pop("max_steps", None)  # an epoch count asked for wins over a default step count
        try:
            config = TrainConfig.model_validate(fields)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error.get("loc") else None
            raise InvalidRequestError(f"{field}: {error['msg']}", request_param(field)) from None

        # The configured minimum of images is a floor, so a client cannot train on less than the operator allows.
        floor = self.config.defaults.get("min_images", TrainConfig.model_fields["min_images"].default)
        if config.min_images < floor:
            raise InvalidRequestError(f"min_images: at least {floor} images are required here; got "
                                      f"{config.min_images}", request_param("min_images"))
        limits = self.config.limits
        for field in _FIELD_LIMITS + (_DREAMBOOTH_LIMITS if config.method == "dreambooth" else ()):
            value, limit = getattr(config, field), getattr(limits, field)
            if value is not None and value > limit:
                raise InvalidRequestError(f"{field}: at most {limit} here; got {value}", request_param(field))
        if len(config.validation_seeds) > limits.validation_images:
            raise InvalidRequestError(f"validation_seeds: at most {limits.validation_images} validation images "
                                      f"(seeds) here; got {len(config.validation_seeds)}",
                                      request_param("validation_seeds"))
        return config.model_dump(mode="json")  # without storage_options (TrainConfig never dumps them)

    def check_length(self, config: TrainConfig, plan: TrainPlan) -> None:
        """An epoch count is held to the step limit too, once the plan knows the steps per epoch; so are the
        validation renders and the checkpoints the run's steps make."""
        limits = self.config.limits
        limit = limits.max_steps
        total = plan.total_steps
        if total > limit:
            field = "max_steps" if config.max_steps else "epochs"
            raise InvalidRequestError(f"{field}: {total} optimizer steps ({plan.steps_per_epoch} per "
                                      f"epoch), over the limit of {limit}", request_param(field))
        if config.validation_every_steps:
            # renders at every multiple of validation_every_steps before the last step, and the final one
            renders = (total - 1) // config.validation_every_steps + 1
            if renders > limits.validation_renders:
                raise InvalidRequestError(
                    f"validation_every_steps: at most {limits.validation_renders} validation renders a run here; "
                    f"{total} steps with validation every {config.validation_every_steps} make {renders}",
                    request_param("validation_every_steps"))
        checkpoints = -(-total // config.checkpoint_every_steps)
        if checkpoints > limits.checkpoints:
            raise InvalidRequestError(
                f"checkpoint_every_steps: at most {limits.checkpoints} checkpoints a run here; {total} steps with a "
                f"checkpoint every {config.checkpoint_every_steps} make {checkpoints}",
                request_param("checkpoint_every_steps"))

    def check_owners(self, config: TrainConfig, plan: TrainPlan) -> None:
        """The dataset must be the caller's or public (another owner's is unknown here), and the
        LoRA name must not be another owner's (409 naming `suffix`)."""
        who = caller()
        try:
            owner, public = DatasetStore(self.storage).owner_of(plan.dataset_id)
        except DatasetNotFoundError:
            owner, public = None, False
        if not who.sees(owner, public):
            raise InvalidRequestError(f"unknown dataset {config.dataset_id!r}", request_param("dataset_id"))
        try:
            LoraRegistry(self.storage).check_owner(config.name, config.owner)
        except LoraRegistryError as exc:
            raise ConflictError(exc.message, request_param("name")) from None

    def check_capacity(self, config: TrainConfig) -> None:
        """num_workers within the configured maximum, or what the cluster's nodes can hold at all: a
        worker group bigger than the cluster waits for resources forever instead of failing."""
        limit = self.config.limits.num_workers
        param = request_param("num_workers")
        if limit is not None:
            if config.num_workers > limit:
                raise InvalidRequestError(f"num_workers: at most {limit} here; got {config.num_workers}", param)
            return
        nodes = self.nodes()
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

    # --- submission -------------------------------------------------------------------------------

    async def create(self, body: FineTuningCreate) -> FineTuningJob:
        # 1. Check inputs: fields, the cluster, then storage (dataset, base model, name, a checkpoint to resume).
        if not self.config.enabled:
            raise NotFoundError("fine-tuning is disabled in this application", "model")
        config = TrainConfig.model_validate({**self.train_fields(body), "storage_options": self.storage_options})
        await asyncio.to_thread(self.check_capacity, config)
        try:
            plan = await asyncio.to_thread(check_inputs, config)
        except TrainConfigError as exc:
            raise InvalidRequestError(exc.message, request_param(exc.param)) from None
        await asyncio.to_thread(self.check_owners, config, plan)
        self.check_length(config, plan)

        # 2. Claim the run folder, so no other job trains into it meanwhile.
        job_id = f"ftjob-{new_id('ft').split('_', 1)[-1]}"
        plan = await asyncio.to_thread(self.claim_run, config, plan, job_id)
        config = config.model_copy(update={"run_name": plan.run_name})

        # 3. The durable record, then the Ray job. Neither holds the storage credentials: a TrainConfig's
        # dump leaves storage_options out, and the job gets them in its runtime_env (_submit).
        record = {
            "id": job_id, "created_at": time.time(), "config": config.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"), "metadata": body.metadata, "owner": config.owner,
        }
        await asyncio.to_thread(self.store.put, record)
        await asyncio.to_thread(self._submit, config, record)
        return await asyncio.to_thread(self.view, record)

    def _submit(self, config: TrainConfig, record: dict) -> None:
        job_id = record["id"]
        runtime_env = dict(self.config.runtime_env)
        # The storage credentials go in the job's environment (env_vars, which the dashboard's web UI masks),
        # never in its entrypoint (ray job list, process lists, the driver's log); training.cli reads them back.
        secrets = {STORAGE_OPTIONS_ENV: json.dumps(self.storage_options)} if self.storage_options else {}
        env_vars = {"PYTHONPATH": os.pathsep.join(p for p in (CODE_ROOT, os.environ.get("PYTHONPATH")) if p),
                    **secrets, **runtime_env.pop("env_vars", {})}
        entrypoint = job_entrypoint(config).replace("python ", f"{sys.executable} ", 1)
        try:
            self.job_client().submit_job(entrypoint=entrypoint, submission_id=job_id,
                                         runtime_env={**runtime_env, "env_vars": env_vars},
                                         metadata={"atelier": "fine_tuning", "lora": config.name})
        except Exception as exc:
            if self._ray_has_job(job_id):
                return  # accepted, though the answer was lost (a timeout after the POST)
            reason = f"the Ray job could not be submitted: {type(exc).__name__}: {exc}"[:2000]
            # The record says so (the run name is free again), and the client may retry.
            self.store.put({**record, "submit_error": reason})
            raise OverloadedError(f"fine-tuning job {job_id} failed: {reason}", None,
                                  retry_after=SUBMIT_RETRY_AFTER_S) from None

    def _ray_has_job(self, job_id: str) -> bool:
        try:
            self.job_client().get_job_info(job_id)
            return True
        except Exception:
            return False

    # --- run claims -------------------------------------------------------------------------------

    def _claim_holder(self, claim: dict) -> str | None:
        """The id of the job holding a claim while it is queued or running; None once it is finished."""
        job_id = claim.get("job_id")
        try:
            record = self.load_record(str(job_id))
        except NotFoundError:  # claimed, and its record is not written yet (or never will be)
            young = time.time() - float(claim.get("claimed_at") or 0) < SUBMIT_GRACE_S
            return str(job_id) if young else None
        return job_id if self.view(record).status in ACTIVE_STATUSES else None

    def claim_run(self, config: TrainConfig, plan: TrainPlan, job_id: str) -> TrainPlan:
        """The plan, with the run name this job now holds. 409 naming ``suffix`` while another job
        trains that name; with ``new_version``, the next run name that no job holds (and whose
        checkpoint, if any, this config may resume) is taken instead."""
        holders = []
        for run_name in _run_name_candidates(config.name, plan.run_name, config.new_version):
            if run_name != plan.run_name:
                try:
                    check_resume(self.storage, run_name, resume_record(config, plan))
                except TrainConfigError:
                    continue  # a run of this name trained differently: not ours to resume
            claim = self.store.claim(run_name, job_id, self._claim_holder)
            if claim.claimed:
                return plan.model_copy(update={"run_name": run_name})
            if claim.holder is not None:
                holders.append(claim.holder)
        holder = f" (job {holders[0]})" if holders else ""
        hint = "" if config.new_version else ", or set new_version to train another version alongside it"
        raise ConflictError(f"a fine-tuning job for {config.name!r} is queued or running{holder}; wait for it to "
                            f"finish or cancel it{hint}", "suffix")

    # --- views ------------------------------------------------------------------------------------

    def load_record(self, job_id: str) -> dict:
        """The caller's job (any for admin); another owner's is as unknown as a missing one."""
        try:
            record = self.store.get(job_id)
        except FineTuningJobNotFoundError:
            record = None
        if record is None or not caller().sees(record.get("owner")):
            raise NotFoundError(f"no fine-tuning job with id {job_id!r}", "fine_tuning_job_id")
        return record

    def view(self, record: dict) -> FineTuningJob:
        """The job as the API shows it: Ray's status of the job, reconciled with the run's own."""
        config, plan = record["config"], record["plan"]
        ray_missing = False
        if record.get("submit_error"):
            ray_status, ray_message, end_time = "NOT_SUBMITTED", record["submit_error"], None
        else:
            try:
                info = self.job_client().get_job_info(record["id"])
                ray_status, ray_message, end_time = str(info.status.value if isinstance(info.status, JobStatus)
                                                        else info.status), info.message, info.end_time
            except Exception as exc:  # gone (cluster restarted), not submitted yet, or Ray cannot be asked
                ray_missing = "status code 404" in str(exc)
                ray_status, ray_message, end_time = "UNKNOWN", f"Ray job unavailable: {exc}", None
        run = read_status(self.storage, config["run_name"])
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
        per_epoch = max(1, int(plan.get("steps_per_epoch") or 1))
        images = self._validation_images(record["id"], config["run_name"], run.validation_images if run else [])
        return FineTuningJob(
            id=record["id"], model=config["base_model"], created_at=int(record["created_at"]),
            finished_at=int(end_time / 1000) if end_time and status in ("succeeded", "failed", "cancelled") else None,
            status=status, fine_tuned_model=run.lora if run and status == "succeeded" else None,
            training_file=plan["dataset_id"], hyperparameters=hyper,
            method={"type": config["method"], "trigger_word": plan.get("trigger_word")}, seed=config["seed"],
            error=error, metadata=record.get("metadata"), run_name=config["run_name"], suffix=config["name"],
            step=step, total_steps=total, progress=round(100.0 * step / max(total, 1), 2) if status != "succeeded"
            else 100.0, loss=run.loss if run and run.loss is not None and math.isfinite(run.loss) else None,
            state=run.state if run else None, resumed_from_step=run.resumed_from_step if run else None,
            epoch=-(-step // per_epoch) if step else None, epochs=-(-total // per_epoch),
            learning_rate=_finite(run.learning_rate) if run and step else None,
            samples_per_s=_finite(run.samples_per_s) if run else None,
            validation_prompt=plan.get("validation_prompt"), validation_images=images,
            result_files=[image.file for image in images],
        )

    @staticmethod
    def _validation_images(job_id: str, run_name: str, rendered: list[dict]) -> list[FineTuningValidationImage]:
        """The run's validation images (status.json lists each render's keys), oldest step first."""
        prefix = run_prefix(run_name)
        out = []
        for image in rendered:
            key = str(image.get("key", ""))
            name = key[len(prefix):] if key.startswith(prefix) else ""
            if _RESULT_FILE.fullmatch(name):
                out.append(FineTuningValidationImage(step=int(image["step"]), seed=int(image["seed"]), file=name,
                                                     url=f"/v1/fine_tuning/jobs/{job_id}/files?name={quote(name)}"))
        return sorted(out, key=lambda image: (image.step, image.seed))

    def open_file(self, job_id: str, name: str | None) -> tuple[Any, int]:
        """``(binary handle, size)`` of one of the job's result files (a validation image); another owner's
        job, or a name the job does not list, is a 404."""
        record = self.load_record(job_id)
        if not name:
            raise InvalidRequestError("name: which of the job's result_files (e.g. "
                                      "validation/step-000008/seed-0.png)", "name")
        run = read_status(self.storage, record["config"]["run_name"])
        listed = {image.file for image in self._validation_images(job_id, record["config"]["run_name"],
                                                                    run.validation_images if run else [])}
        if name not in listed:
            raise NotFoundError(f"fine-tuning job {job_id} has no file {name!r}", "file")
        key = run_prefix(record["config"]["run_name"]) + name
        try:
            return self.storage.open(key), self.storage.size(key)
        except (ObjectNotFoundError, FileNotFoundError):
            raise NotFoundError(f"fine-tuning job {job_id} has no file {name!r}", "file") from None

    async def list(self, after: str | None, limit: int) -> FineTuningJobList:
        who = caller()

        def page() -> FineTuningJobList:
            records = [r for r in self.store.list() if who.sees(r.get("owner"))]
            if after is not None:
                ids = [r["id"] for r in records]
                records = records[ids.index(after) + 1:] if after in ids else []
            return FineTuningJobList(data=[self.view(r) for r in records[:limit]], has_more=len(records) > limit)

        return await asyncio.to_thread(page)

    async def get(self, job_id: str) -> FineTuningJob:
        return await asyncio.to_thread(lambda: self.view(self.load_record(job_id)))

    async def events(self, job_id: str, limit: int) -> FineTuningEventList:
        """The run's log lines (those it prints as `[run] …`, and errors), newest first."""

        def events() -> FineTuningEventList:
            record = self.load_record(job_id)
            try:
                logs = self.job_client().get_job_logs(job_id)
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
                    if match[4]:
                        event.data["learning_rate"] = float(match[4])
                    if match[5]:
                        event.data.update(epoch=int(match[5]), epochs=int(match[6]))
                    if match[7]:
                        event.data["samples_per_s"] = float(match[7])
                out.append(event)
            out.reverse()
            return FineTuningEventList(data=out[:limit], has_more=len(out) > limit)

        return await asyncio.to_thread(events)

    async def cancel(self, job_id: str) -> FineTuningJob:
        """Stops the Ray job; a stopped run registers nothing."""

        def cancel() -> FineTuningJob:
            record = self.load_record(job_id)
            client = self.job_client()
            client.stop_job(job_id)
            deadline = time.monotonic() + 10  # answer with the stopped state when it comes quickly
            while time.monotonic() < deadline and str(client.get_job_status(job_id).value) not in (
                    "STOPPED", "SUCCEEDED", "FAILED"):
                time.sleep(0.25)
            return self.view(record)

        return await asyncio.to_thread(cancel)


def build_fine_tuning_service(storage: Storage, config: FineTuningConfig, base: SDXLLimits, storage_root: str,
                              storage_options: dict[str, Any]) -> FineTuningService:
    """`base`: SDXL's Limits (the model fine-tuning trains); `storage_root`/`storage_options`: the
    app's, handed to each training job."""
    return FineTuningService(FineTuningStore(storage), storage, config, base, storage_root, storage_options)
