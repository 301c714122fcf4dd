"""A fine-tuning run's plan and checks, and where its state lives: what the HTTP API needs without torch or Ray.

    plan = check_inputs(config)          # TrainConfigError naming the field, or the numbers the run will use
    status = read_status(storage, plan.run_name)
    entrypoint = job_entrypoint(config)  # the Ray job's shell command (training.cli)

:func:`check_inputs` refuses bad input before anything starts: an unknown dataset, version or
base model, fewer usable images than ``min_images`` (or than workers x batch size), a name that
is registered already unless ``new_version`` is set, and a run folder whose latest checkpoint
was trained with another config (rank, dataset, learning rate...: RESUME_FIELDS), which the run
would resume. Field checks (rank, learning rate, resolution...) are in
:class:`training.config.TrainConfig`. The training itself is :func:`training.loop.train`.

Storage layout of a run (``run_name`` defaults to the LoRA name)::

    training/<run_name>/status.json                state, step, total_steps, loss... (rank 0, every step)
    training/<run_name>/checkpoint_<step>/         Ray Train checkpoints (RunConfig storage_path = training/)
    training/<run_name>/validation/step-<N>/seed-<S>.png
    training/class_images/<hash>/<index>.png       DreamBooth class images, shared between runs
    models/loras/<name>/<version>/                 the registered adapter (storage/registry.py)

Nothing here imports torch, diffusers or Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Literal

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from pydantic import BaseModel, Field

from storage.datasets import DatasetNotFoundError, DatasetStore
from storage.fs import ObjectNotFoundError, Storage
from storage.keys import validate_id
from storage.registry import LoraRecord, LoraRegistry
from training.config import TrainConfig, TrainConfigError, instance_caption

__all__ = [
    "TrainPlan",
    "TrainResult",
    "RunStatus",
    "RunState",
    "StatusWriter",
    "check_inputs",
    "check_resume",
    "resume_record",
    "read_status",
    "status_key",
    "run_prefix",
    "checkpoint_dir_name",
    "class_images_prefix",
    "class_image_key",
    "job_entrypoint",
    "TRAINING_PREFIX",
    "CLASS_IMAGES_PREFIX",
]

TRAINING_PREFIX = "training/"
CLASS_IMAGES_PREFIX = f"{TRAINING_PREFIX}class_images/"

RunState = Literal["preparing", "generating_class_images", "training", "finalizing", "succeeded", "failed"]


def run_prefix(run_name: str) -> str:
    """``training/<run_name>/``"""
    return f"{TRAINING_PREFIX}{validate_id(run_name, 'run name')}/"


def status_key(run_name: str) -> str:
    """``training/<run_name>/status.json``"""
    return f"{run_prefix(run_name)}status.json"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_<step>``, zero-padded: the folder of a run's checkpoint (Ray Train's ``checkpoint_dir_name``)."""
    return f"checkpoint_{step:08d}"


def class_images_prefix(config: TrainConfig) -> str:
    """``training/class_images/<hash>/``: DreamBooth class images (:mod:`training.class_images`). Same
    model, prompt, size and steps give the same images: the cache is shared between runs."""
    spec = json.dumps([config.base_model, config.class_prompt, config.resolution, config.class_inference_steps])
    return f"{CLASS_IMAGES_PREFIX}{hashlib.sha256(spec.encode()).hexdigest()[:16]}/"


def class_image_key(prefix: str, index: int) -> str:
    """``<prefix><index>.png``: class image ``index``, generated with seed ``index``."""
    return f"{prefix}{index:05d}.png"


# --- plan: everything checked and derived before training starts ---------------------------------


class TrainPlan(BaseModel):
    run_name: str
    dataset_id: str
    dataset_version: int
    num_images: int = Field(description="Usable images (after the min_size filter).")
    trigger_word: str | None
    instance_caption: str | None = Field(description="Caption for uncaptioned images (every image, dreambooth).")
    validation_prompt: str
    steps_per_epoch: int
    total_steps: int
    class_images_prefix: str | None = None


class TrainResult(BaseModel):
    run_name: str
    lora: LoraRecord
    metrics: dict[str, Any]


class RunStatus(BaseModel):
    """What ``training/<run_name>/status.json`` holds."""

    name: str
    run_name: str
    state: RunState
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    learning_rate: float | None = None
    epoch: int = 0
    samples_per_s: float | None = None
    validation_images: list[dict[str, Any]] = Field(
        default_factory=list, description="Rendered so far: {step, seed, key} (rank 0 adds each render).")
    resumed_from_step: int | None = None
    checkpoint_step: int | None = Field(None, description="Step of the latest checkpoint written to storage.")
    message: str | None = None
    error: str | None = None
    lora: str | None = Field(None, description="name:version once registered.")
    started_at: float | None = None
    updated_at: float | None = None


def read_status(storage: Storage, run_name: str) -> RunStatus | None:
    """The run's status file, or None if the run has not started writing one."""
    try:
        return RunStatus.model_validate(storage.get_json(status_key(run_name)))
    except ObjectNotFoundError:
        return None


class StatusWriter:
    """Keeps a run's status in memory and writes it whole on every update (atomic writes)."""

    def __init__(self, storage: Storage, name: str, run_name: str, **fields: Any):
        self.storage = storage
        previous = read_status(storage, run_name)
        base = previous.model_dump() if previous else {"name": name, "run_name": run_name, "state": "preparing"}
        self.status = RunStatus.model_validate({**base, **fields})
        if self.status.started_at is None:
            self.status.started_at = time.time()

    def update(self, **fields: Any) -> None:
        self.status = self.status.model_copy(update={**fields, "updated_at": time.time()})
        try:
            self.storage.put_json(status_key(self.status.run_name), self.status.model_dump(mode="json"))
        except Exception as exc:  # progress is best effort; training goes on
            print(f"warning: could not write the run status: {exc}", file=sys.stderr, flush=True)


def _hub_model_index(base_model: str) -> dict:
    """A hub id's ``model_index.json`` (cached, or from the hub), as diffusers' ``DiffusionPipeline.load_config``
    finds it, with its error messages; huggingface_hub only, so that no torch is imported."""
    try:
        path = hf_hub_download(base_model, "model_index.json")
    except RepositoryNotFoundError:
        raise OSError(f"{base_model} is not a local folder and is not a valid model identifier listed on "
                      "'https://huggingface.co/models'") from None
    except EntryNotFoundError:  # also: not cached, and the hub unreachable or offline
        raise OSError(f"{base_model} does not appear to have a file named model_index.json.") from None
    except HfHubHTTPError as err:
        raise OSError(f"There was a specific connection error when trying to load {base_model}:\n{err}") from None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise OSError(f"It looks like the config file at '{path}' is not a valid JSON file.") from None


def _check_base_model(base_model: str) -> None:
    if os.path.isdir(base_model):
        index = os.path.join(base_model, "model_index.json")
        try:
            with open(index, encoding="utf-8") as f:
                class_name = json.load(f).get("_class_name", "")
        except (OSError, ValueError):
            raise TrainConfigError(f"base_model {base_model!r} has no readable model_index.json", "base_model") from None
        if "StableDiffusionXL" not in class_name:
            raise TrainConfigError(f"base_model {base_model!r} is a {class_name}, not an SDXL pipeline", "base_model")
        return
    if os.path.isabs(base_model) or base_model.startswith((".", "~")) or base_model.count("/") != 1:
        raise TrainConfigError(f"base_model {base_model!r} is neither a model folder nor a hub id", "base_model")
    try:  # a hub id: its config must be reachable (cached, or on the hub)
        _hub_model_index(base_model)
    except Exception as exc:
        raise TrainConfigError(f"unknown base_model {base_model!r}: {exc}", "base_model") from None


def check_inputs(config: TrainConfig) -> TrainPlan:
    """Every check that needs storage, and the numbers the run will use. TrainConfigError names the field.

    Cheap (no Ray, no torch): an HTTP handler calls it before submitting the job.
    """
    storage = Storage(config.storage_root, config.storage_options)

    # 1. Base model.
    _check_base_model(config.base_model)

    # 2. Dataset, version and usable images.
    datasets = DatasetStore(storage)
    try:
        dataset_id = datasets.resolve(config.dataset_id, config.owner)
        info = datasets.get(dataset_id)
    except DatasetNotFoundError:
        raise TrainConfigError(f"unknown dataset {config.dataset_id!r}", "dataset_id") from None
    if not info.versions:
        raise TrainConfigError(f"dataset {config.dataset_id!r} has no images yet", "dataset_id")
    version = config.dataset_version or info.latest_version
    if version not in {v.version for v in info.versions}:
        raise TrainConfigError(f"dataset {config.dataset_id!r} has no version {version}", "dataset_version")
    table = datasets.manifest(dataset_id, version)
    widths, heights = table.column("width").to_pylist(), table.column("height").to_pylist()
    num_images = sum(1 for w, h in zip(widths, heights) if min(w, h) >= config.min_size)
    if num_images < config.min_images:
        raise TrainConfigError(
            f"dataset {config.dataset_id!r} version {version} has {num_images} usable images "
            f"(shorter side >= {config.min_size}), fewer than min_images {config.min_images}", "dataset_id")
    per_worker = num_images // config.num_workers
    if per_worker < config.batch_size:
        raise TrainConfigError(
            f"{num_images} images give each of {config.num_workers} workers {per_worker}, "
            f"fewer than batch_size {config.batch_size}", "batch_size")
    if config.method == "dreambooth" and config.num_class_images // config.num_workers < config.batch_size:
        raise TrainConfigError(
            f"num_class_images {config.num_class_images} gives each of {config.num_workers} workers fewer "
            f"than batch_size {config.batch_size} class images", "num_class_images")

    # 3. The name, and the run folder (a re-run of the same run name resumes it).
    registry = LoraRegistry(storage)
    versions = registry.versions(config.name)
    if versions and not config.new_version:
        raise TrainConfigError(
            f"a LoRA named {config.name!r} is registered already; set new_version to add a version", "name")
    run_name = config.run_name or (f"{config.name}-v{versions[-1] + 1}" if versions else config.name)

    # 4. Captions, prompts and length.
    trigger_word = config.trigger_word or info.trigger_word
    caption = instance_caption(config.instance_prompt, trigger_word)
    validation_prompt = config.validation_prompt or caption or "a photo"
    steps_per_epoch = max(1, per_worker // config.batch_size // config.gradient_accumulation)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    class_prefix = class_images_prefix(config) if config.method == "dreambooth" else None
    plan = TrainPlan(run_name=run_name, dataset_id=dataset_id, dataset_version=version, num_images=num_images,
                     trigger_word=trigger_word, instance_caption=caption, validation_prompt=validation_prompt,
                     steps_per_epoch=steps_per_epoch, total_steps=total_steps, class_images_prefix=class_prefix)

    # 5. A run folder with a checkpoint is resumed: it must have been trained the same way.
    check_resume(storage, run_name, resume_record(config, plan))
    return plan


def resume_record(config: TrainConfig, plan: TrainPlan) -> dict[str, Any]:
    """What a checkpoint records of how its run trains (``state.json["config"]``); see RESUME_FIELDS."""
    record = config.resume_fields()
    if os.path.isdir(config.base_model):  # train() hands workers the absolute path
        record["base_model"] = os.path.abspath(config.base_model)
    return {**record, "dataset_id": plan.dataset_id, "dataset_version": plan.dataset_version,
            "trigger_word": plan.trigger_word}


_CHECKPOINT_STATE = re.compile(r"checkpoint_(\d+)/state\.json")


def check_resume(storage: Storage, run_name: str, expected: dict[str, Any]) -> int | None:
    """The step of the run's latest checkpoint (None: nothing to resume). TrainConfigError naming the
    first field whose value differs from the one the checkpoint was trained with: resuming would
    fail on the LoRA shapes (rank, targets) or silently mix two trainings (data, prompts, learning rate)."""
    prefix = run_prefix(run_name)
    steps = sorted(int(m.group(1)) for key in storage.list(prefix)
                   if (m := _CHECKPOINT_STATE.fullmatch(key[len(prefix):])))
    if not steps:
        return None
    step = steps[-1]
    try:
        saved = storage.get_json(f"{prefix}{checkpoint_dir_name(step)}/state.json").get("config")
    except (ObjectNotFoundError, ValueError, AttributeError):
        saved = None
    if not isinstance(saved, dict):
        return step  # a checkpoint written before checkpoints recorded their config
    for field, value in expected.items():
        if field in saved and saved[field] != value:
            raise TrainConfigError(
                f"run {run_name!r} has a checkpoint at step {step} trained with {field}={saved[field]!r}, "
                f"but this run has {field}={value!r}; re-running a name resumes it, so use the same {field}, "
                f"or another name (or new_version) to start a new run", field)
    return step


def job_entrypoint(config: TrainConfig) -> str:
    """The shell command a Ray job runs for this config (``JobSubmissionClient.submit_job(entrypoint=...)``).

    Without ``storage_options``: an entrypoint shows in ``ray job list``, process lists and logs. The
    job gets them in its runtime_env's ``env_vars`` (``STORAGE_OPTIONS_ENV``), which training.cli reads."""
    return f"python -m training.cli --config-json {shlex.quote(config.model_dump_json(exclude={'storage_options'}))}"
