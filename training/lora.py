"""LoRA and DreamBooth fine-tuning of SDXL on Ray Train, over a dataset from :mod:`storage.datasets`.

    python -m training.lora --config cfg.yaml              # e.g. as a Ray job's entrypoint
    result = train(load_config("cfg.yaml"))                # from Python (connects to / starts Ray)

What a run does:

1. ``check_inputs`` refuses bad input before anything starts: an unknown dataset, version or
   base model, fewer usable images than ``min_images`` (or than workers x batch size), and a
   name that is registered already unless ``new_version`` is set, and a run folder whose latest
   checkpoint was trained with another config (rank, dataset, learning rate...: RESUME_FIELDS),
   which it would resume. Field checks (rank, learning rate, resolution...) are in
   :class:`training.config.TrainConfig`.
2. The dataset version is read as a Ray Dataset (:func:`training.data.read_dataset`) and
   prepared (center crop to ``resolution``, captions). DreamBooth class images that are missing
   from the cache are generated first by a Ray Data ``map_batches`` batch-inference step with the
   SDXL pipeline, and cached in storage for later runs.
3. A ``TorchTrainer`` runs the loop on ``num_workers`` workers (data parallel: each worker gets a
   shard through ``ray.train.get_dataset_shard``, and the LoRA gradients are averaged with one
   all-reduce per optimizer step). The loss is SDXL's: VAE latents, noise at random timesteps,
   the UNet conditioned on both text encoders and the size/crop time ids, with epsilon or
   v-prediction targets from the scheduler config, plus the prior-preservation term for DreamBooth
   (as in diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``).
4. Every ``checkpoint_every_steps`` the LoRA weights, optimizer and scheduler state are reported
   with ``ray.train.report`` to the run folder in storage. A restarted worker group
   (``FailureConfig(max_failures)``) and a re-run with the same run name resume from the latest
   checkpoint, not from step 0.
5. At the end, rank 0 saves ``pytorch_lora_weights.safetensors`` with
   ``StableDiffusionXLPipeline.save_lora_weights``, loads it into a fresh pipeline to render the
   validation images at the configured seeds, writes the manifest and registers the adapter in
   :class:`storage.registry.LoraRegistry`. A run that fails registers nothing.

Storage layout of a run (``run_name`` defaults to the LoRA name)::

    training/<run_name>/status.json                state, step, total_steps, loss... (rank 0, every step)
    training/<run_name>/checkpoint_<step>/         Ray Train checkpoints (RunConfig storage_path = training/)
    training/<run_name>/validation/step-<N>/seed-<S>.png
    training/class_images/<hash>/<index>.png       DreamBooth class images, shared between runs
    models/loras/<name>/<version>/                 the registered adapter (storage/registry.py)

While a run goes on, :func:`read_status` (or any reader of ``status.json``) shows its progress.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
import time
from functools import partial
from typing import Any, Iterator, Literal

import numpy as np
from pydantic import BaseModel, Field

from storage.datasets import DatasetNotFoundError, DatasetStore
from storage.fs import ObjectNotFoundError, Storage
from storage.keys import validate_id
from storage.registry import LoraManifest, LoraRecord, LoraRegistry
from training.config import TEXT_ENCODER_TARGET_MODULES, TrainConfig, TrainConfigError, load_config
from training.data import instance_caption

__all__ = [
    "TrainPlan",
    "TrainResult",
    "RunStatus",
    "check_inputs",
    "check_resume",
    "resume_record",
    "train",
    "read_status",
    "status_key",
    "run_prefix",
    "job_entrypoint",
    "ensure_class_images",
    "FAIL_AT_ENV",
]

TRAINING_PREFIX = "training/"
CLASS_IMAGES_PREFIX = f"{TRAINING_PREFIX}class_images/"
# Test hook: "RANK:STEP" makes that worker exit abruptly once, right after that optimizer step.
FAIL_AT_ENV = "ATELIER_TRAIN_FAIL_AT"

RunState = Literal["preparing", "generating_class_images", "training", "finalizing", "succeeded", "failed"]


def run_prefix(run_name: str) -> str:
    """``training/<run_name>/``"""
    return f"{TRAINING_PREFIX}{validate_id(run_name, 'run name')}/"


def status_key(run_name: str) -> str:
    """``training/<run_name>/status.json``"""
    return f"{run_prefix(run_name)}status.json"


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


class _StatusWriter:
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
        from diffusers import DiffusionPipeline

        DiffusionPipeline.load_config(base_model)
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
        dataset_id = datasets.resolve(config.dataset_id)
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
    class_prefix = _class_images_prefix(config) if config.method == "dreambooth" else None
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
        saved = storage.get_json(f"{prefix}{_checkpoint_dir_name(step)}/state.json").get("config")
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
    """The shell command a Ray job runs for this config (``JobSubmissionClient.submit_job(entrypoint=...)``)."""
    return f"python -m training.lora --config-json {shlex.quote(config.model_dump_json())}"


# --- DreamBooth class images: Ray Data batch inference --------------------------------------------


def _class_images_prefix(config: TrainConfig) -> str:
    # Same model, prompt, size and steps give the same images: the cache is shared between runs.
    spec = json.dumps([config.base_model, config.class_prompt, config.resolution, config.class_inference_steps])
    return f"{CLASS_IMAGES_PREFIX}{hashlib.sha256(spec.encode()).hexdigest()[:16]}/"


def _class_image_key(prefix: str, index: int) -> str:
    return f"{prefix}{index:05d}.png"


class ClassImageGenerator:
    """Ray Data ``map_batches`` callable: one SDXL pipeline per actor; class image ``i`` is seeded ``i``."""

    def __init__(self, base_model: str, storage: Storage, prefix: str, prompt: str, resolution: int, steps: int,
                 use_gpu: bool):
        import torch
        from diffusers import StableDiffusionXLPipeline

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = StableDiffusionXLPipeline.from_pretrained(base_model, torch_dtype=dtype).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.storage, self.prefix, self.prompt = storage, prefix, prompt
        self.resolution, self.steps = resolution, steps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        indices = [int(i) for i in batch["index"]]
        images = self.pipe(
            prompt=[self.prompt] * len(indices), num_inference_steps=self.steps, width=self.resolution,
            height=self.resolution, generator=[torch.Generator("cpu").manual_seed(i) for i in indices],
        ).images
        keys = []
        for index, image in zip(indices, images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            keys.append(self.storage.put_bytes(_class_image_key(self.prefix, index), buffer.getvalue(), "image/png"))
        return {"key": np.asarray(keys, dtype=object)}


def ensure_class_images(config: TrainConfig, storage: Storage, prefix: str, cpus: float = 1.0) -> list[str]:
    """Keys of ``num_class_images`` class images, generating the missing ones (Ray Data batch inference)."""
    import ray

    wanted = [_class_image_key(prefix, i) for i in range(config.num_class_images)]
    present = set(storage.list(prefix))
    missing = [i for i, key in enumerate(wanted) if key not in present]
    if missing:
        generated = (
            ray.data.from_items([{"index": i} for i in missing])
            .map_batches(ClassImageGenerator, batch_size=4, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cpus,
                         num_gpus=1 if config.use_gpu else 0,
                         fn_constructor_kwargs=dict(base_model=config.base_model, storage=storage, prefix=prefix,
                                                    prompt=config.class_prompt, resolution=config.resolution,
                                                    steps=config.class_inference_steps, use_gpu=config.use_gpu))
            .take_all()
        )
        if len(generated) != len(missing):
            raise RuntimeError(f"generated {len(generated)} class images, expected {len(missing)}")
    return wanted


def _load_class_images(batch: dict[str, np.ndarray], storage: Storage, caption: str) -> dict[str, np.ndarray]:
    from PIL import Image

    images = []
    for key in batch["key"]:
        with Image.open(io.BytesIO(storage.get_bytes(str(key)))) as image:
            images.append(np.asarray(image.convert("RGB")))
    n, (height, width) = len(images), images[0].shape[:2]
    column = lambda value: np.full(n, value, dtype=np.int32)  # noqa: E731
    return {"image": np.stack(images), "caption": np.asarray([caption] * n, dtype=object),
            "width": column(width), "height": column(height), "original_width": column(width),
            "original_height": column(height), "crop_top": column(0), "crop_left": column(0)}


# --- datasets ---------------------------------------------------------------------------------------


def _set_captions(batch: dict[str, np.ndarray], caption: str | None, trigger_word: str | None,
                  replace: bool) -> dict[str, np.ndarray]:
    """DreamBooth: every image gets the instance caption. LoRA: captions gain the trigger word if absent."""
    captions = []
    for text in batch["caption"]:
        text = str(text)
        if replace and caption:
            text = caption
        elif trigger_word and trigger_word.lower() not in text.lower():
            text = f"{trigger_word}, {text}" if text.strip() else trigger_word
        captions.append(text)
    batch["caption"] = np.asarray(captions, dtype=object)
    return batch


def _instance_dataset(config: TrainConfig, plan: TrainPlan):
    from training.data import prepare_for_training, read_dataset

    ds = read_dataset(config.storage_root, config.storage_options, plan.dataset_id, plan.dataset_version,
                      num_cpus=config.data_cpus)
    ds = prepare_for_training(ds, config.resolution, "center_crop", config.min_size, config.instance_prompt,
                              plan.trigger_word, num_cpus=config.data_cpus)
    return ds.map_batches(partial(_set_captions, caption=plan.instance_caption, trigger_word=plan.trigger_word,
                                  replace=config.method == "dreambooth"), batch_format="numpy", batch_size=None,
                          num_cpus=config.data_cpus)


def _class_dataset(config: TrainConfig, storage: Storage, keys: list[str]):
    import ray

    return ray.data.from_items([{"key": k} for k in keys]).map_batches(
        partial(_load_class_images, storage=storage, caption=config.class_prompt), batch_format="numpy",
        batch_size=None, num_cpus=config.data_cpus)


def _ray_storage(storage: Storage) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: the storage root's ``training/`` folder."""
    if storage.protocol == "file":
        return os.path.join(storage.root, "training"), None
    import pyarrow.fs

    # The same s3fs instance (endpoint, credentials) as Storage, seen through pyarrow.
    return f"{storage.root.removeprefix('s3://')}/training", pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs))


def _fail_at_from_env() -> tuple[int, int] | None:
    value = os.environ.get(FAIL_AT_ENV)
    if not value:
        return None
    rank, _, step = value.partition(":")
    return int(rank), int(step)


# --- the driver -------------------------------------------------------------------------------------


def train(config: TrainConfig | dict | str | os.PathLike) -> TrainResult:
    """Check, prepare and run one training job; returns the registered adapter and final metrics.

    Raises TrainConfigError (with ``param``) on bad input before anything runs, and the training
    error (``ray.train.TrainingFailedError``) if the run fails; nothing is registered then.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # 1. Check inputs. Workers run in another working directory: local paths become absolute.
    config = load_config(config)
    plan = check_inputs(config)
    storage = Storage(config.storage_root, config.storage_options)
    base_model = os.path.abspath(config.base_model) if os.path.isdir(config.base_model) else config.base_model
    config = config.model_copy(update={"storage_root": storage.root, "base_model": base_model})
    status = _StatusWriter(storage, config.name, plan.run_name, state="preparing", error=None,
                           total_steps=plan.total_steps)
    status.update()
    print(f"[{plan.run_name}] {config.method} on {plan.num_images} images of {plan.dataset_id} "
          f"v{plan.dataset_version}: {plan.total_steps} steps on {config.num_workers} workers", flush=True)
    try:
        if not ray.is_initialized():
            ray.init()

        # 2. Datasets: the instance images, and for DreamBooth the (cached or generated) class images.
        datasets = {"train": _instance_dataset(config, plan)}
        if config.method == "dreambooth":
            status.update(state="generating_class_images")
            keys = ensure_class_images(config, storage, plan.class_images_prefix,
                                       cpus=min(1.0, config.cpus_per_worker * config.num_workers))
            datasets["class"] = _class_dataset(config, storage, keys)

        # 3. Train on Ray Train workers.
        status.update(state="training")
        storage_path, filesystem = _ray_storage(storage)
        resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={"config": config.model_dump(mode="json"), "plan": plan.model_dump(mode="json"),
                               "fail_at": _fail_at_from_env()},
            scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=plan.run_name, storage_path=storage_path, storage_filesystem=filesystem,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep)),
            datasets=datasets,
        )
        result = trainer.fit()
    except BaseException as exc:
        # re-read: rank 0 has been writing the step and loss meanwhile
        _StatusWriter(storage, config.name, plan.run_name).update(state="failed",
                                                                  error=f"{type(exc).__name__}: {exc}"[:4000])
        raise

    # 4. Rank 0 registered the adapter; report it.
    output = result.return_value or {}
    registry = LoraRegistry(storage)
    record = (LoraRecord.model_validate(output["lora"]) if "lora" in output
              else registry.find_by_run(config.name, plan.run_name))
    if record is None:
        _StatusWriter(storage, config.name, plan.run_name).update(
            state="failed", error="training finished but no adapter was registered")
        raise RuntimeError(f"run {plan.run_name!r} finished without registering an adapter")
    metrics = output.get("metrics") or record.manifest.metrics
    _StatusWriter(storage, config.name, plan.run_name).update(state="succeeded", lora=record.id, error=None)
    print(f"[{plan.run_name}] registered {record.id}", flush=True)
    return TrainResult(run_name=plan.run_name, lora=record, metrics=metrics)


# --- the worker ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Models:
    pipe: Any  # StableDiffusionXLPipeline holding the modules below (validation renders through it)
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    weight_dtype: Any


@dataclasses.dataclass
class _Encoded:
    """One micro-batch ready for the UNet (instance rows first, then class rows with prior preservation)."""

    latents: Any
    time_ids: Any
    captions: list[str]
    prompt_embeds: Any = None  # None when the text encoders train: encoded every step
    pooled_embeds: Any = None


def _load_models(config: TrainConfig, device, weight_dtype) -> _Models:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(config.base_model, torch_dtype=weight_dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16; diffusers' scripts keep it in fp32
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return _Models(pipe=pipe, unet=pipe.unet, vae=pipe.vae, text_encoders=[pipe.text_encoder, pipe.text_encoder_2],
                   tokenizers=[pipe.tokenizer, pipe.tokenizer_2],
                   noise_scheduler=DDPMScheduler.from_pretrained(config.base_model, subfolder="scheduler"),
                   weight_dtype=weight_dtype)


def _add_lora(models: _Models, config: TrainConfig) -> dict[str, dict[str, Any]]:
    """Adds the adapters; returns the trainable parameters by module (``unet``, ``text_encoder``...)."""
    import torch
    from peft import LoraConfig

    models.unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                       target_modules=config.target_modules))
    modules = {"unet": models.unet}
    if config.train_text_encoder:
        text_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, init_lora_weights="gaussian",
                                 target_modules=TEXT_ENCODER_TARGET_MODULES)
        for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders):
            encoder.add_adapter(text_config)
            modules[name] = encoder
    trainable = {}
    for name, module in modules.items():
        params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        for p in params.values():
            p.data = p.data.to(torch.float32)  # LoRA weights train in fp32 under mixed precision
        trainable[name] = params
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            for encoder in models.text_encoders:
                encoder.gradient_checkpointing_enable()
    return trainable


def _encode_prompts(models: _Models, captions: list[str], device) -> tuple[Any, Any]:
    # From diffusers' train_dreambooth_lora_sdxl.py `encode_prompt`: the penultimate hidden states of
    # both encoders, concatenated; the pooled embedding of the second.
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(models.tokenizers, models.text_encoders):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        output = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = output[0]
        embeds.append(output[-1][-2])
    return torch.cat(embeds, dim=-1), pooled.view(len(captions), -1)


def _encode_batch(models: _Models, batch: dict[str, np.ndarray], device, encode_text: bool) -> _Encoded:
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(np.stack(list(batch["image"])))).permute(0, 3, 1, 2)
    pixels = pixels.to(device, torch.float32) / 127.5 - 1.0
    with torch.no_grad():
        latents = models.vae.encode(pixels).latent_dist.sample() * models.vae.config.scaling_factor
        # SDXL micro-conditioning: original size, crop top-left, target size (all height first)
        time_ids = torch.tensor(np.stack([batch["original_height"], batch["original_width"], batch["crop_top"],
                                          batch["crop_left"], batch["height"], batch["width"]], axis=1),
                                dtype=torch.float32)
        captions = [str(c) for c in batch["caption"]]
        encoded = _Encoded(latents=latents, time_ids=time_ids, captions=captions)
        if encode_text:
            encoded.prompt_embeds, encoded.pooled_embeds = _encode_prompts(models, captions, device)
    return encoded


def _merge_batches(instance: dict, prior: dict) -> dict:
    keys = ("image", "caption", "original_height", "original_width", "crop_top", "crop_left", "height", "width")
    return {k: np.concatenate([np.asarray(list(instance[k]) if k == "image" else instance[k]),
                               np.asarray(list(prior[k]) if k == "image" else prior[k])]) for k in keys}


def _batches(models: _Models, shard, class_shard, config: TrainConfig, device, rank: int, first_epoch: int
             ) -> Iterator[tuple[_Encoded, int]]:
    """Endless ``(micro-batch, epoch)`` of this worker's shard. With ``cache_latents`` the first
    epoch is encoded once and later epochs replay it in a new order, without reading the data again."""
    encode_text = not config.train_text_encoder
    iterate = lambda ds, epoch: ds.iter_batches(  # noqa: E731
        batch_size=config.batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=max(4 * config.batch_size, 16), local_shuffle_seed=config.seed + 7919 * epoch + rank)

    def class_batches() -> Iterator[dict]:
        epoch = first_epoch
        while True:
            count = 0
            for batch in iterate(class_shard, epoch):
                count += 1
                yield batch
            if count == 0:
                raise RuntimeError(f"worker {rank}'s class image shard holds fewer than batch_size images")
            epoch += 1

    prior = class_batches() if class_shard is not None else None
    cache: list[_Encoded] = []
    epoch = first_epoch
    while True:
        if cache:
            order = np.random.default_rng(config.seed + epoch + 104729 * rank).permutation(len(cache))
            for i in order:
                yield cache[i], epoch
        else:
            count = 0
            for batch in iterate(shard, epoch):
                encoded = _encode_batch(models, _merge_batches(batch, next(prior)) if prior else batch, device,
                                        encode_text)
                if config.cache_latents:
                    cache.append(encoded)
                count += 1
                yield encoded, epoch
            if count == 0:
                raise RuntimeError(f"worker {rank}'s data shard holds fewer than batch_size={config.batch_size} images")
        epoch += 1


def _loss(models: _Models, batch: _Encoded, config: TrainConfig, device, autocast) -> Any:
    # From diffusers' train_dreambooth_lora_sdxl.py: noise the latents at random timesteps and
    # regress the UNet's prediction on the scheduler's target.
    import torch
    import torch.nn.functional as F

    scheduler = models.noise_scheduler
    latents = batch.latents.to(device, torch.float32)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast():  # fp32 LoRA weights on fp16/bf16 base weights need autocast
        if batch.prompt_embeds is None:  # the text encoders train: encode with gradients
            prompt_embeds, pooled = _encode_prompts(models, batch.captions, device)
        else:
            prompt_embeds, pooled = batch.prompt_embeds.to(device), batch.pooled_embeds.to(device)
        prediction = models.unet(noisy.to(models.weight_dtype), timesteps, prompt_embeds,
                                 added_cond_kwargs={"time_ids": batch.time_ids.to(device), "text_embeds": pooled},
                                 return_dict=False)[0]
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unknown prediction type {scheduler.config.prediction_type}")
    if config.method == "dreambooth":  # instance rows first, class rows second
        prediction, prior_prediction = torch.chunk(prediction, 2, dim=0)
        target, prior_target = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(prior_prediction.float(), prior_target.float(), reduction="mean")
        return F.mse_loss(prediction.float(), target.float(), reduction="mean") + config.prior_loss_weight * prior_loss
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def _all_reduce_mean(tensors: list, world_size: int) -> None:
    """Averages ``tensors`` in place across workers with one flat all-reduce."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _broadcast_from_rank0(tensors: list, world_size: int) -> None:
    import torch
    import torch.distributed as dist

    if world_size == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _save_checkpoint(folder: str, trainable: dict, optimizer, lr_scheduler, scaler, state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({f"{m}.{n}": p.detach().cpu().contiguous() for m, ps in trainable.items() for n, p in ps.items()},
              os.path.join(folder, "lora.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None}, os.path.join(folder, "optimizer.pt"))
    with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f)


def _load_checkpoint(folder: str, trainable: dict, optimizer, lr_scheduler, scaler) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = load_file(os.path.join(folder, "lora.safetensors"))
    with torch.no_grad():
        for m, params in trainable.items():
            for n, p in params.items():
                p.copy_(weights[f"{m}.{n}"])
    training_state = torch.load(os.path.join(folder, "optimizer.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(training_state["optimizer"])
    lr_scheduler.load_state_dict(training_state["lr_scheduler"])
    if scaler is not None and training_state.get("scaler"):
        scaler.load_state_dict(training_state["scaler"])
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return json.load(f)


def _checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def _latest_checkpoint(storage: Storage, run_name: str, rank: int, world: int, device):
    """The checkpoint to resume from: ``ray.train.get_checkpoint()``, or a newer one rank 0 recorded.

    Ray registers a reported checkpoint when it next polls the workers (every couple of seconds),
    so one uploaded just before a worker died can be missing from ``get_checkpoint()``. Rank 0
    records every finished upload in status.json; the newer of the two wins, agreed by broadcast.
    """
    import ray.train
    import torch
    import torch.distributed as dist

    checkpoint = ray.train.get_checkpoint()
    match = re.fullmatch(r"checkpoint_(\d+)", os.path.basename(checkpoint.path.rstrip("/"))) if checkpoint else None
    step = int(match.group(1)) if match else 0
    if rank == 0:
        status = read_status(storage, run_name)
        if status is not None and (status.checkpoint_step or 0) > step:
            step = status.checkpoint_step
    if world > 1:
        agreed = torch.tensor([step], dtype=torch.int64, device=device)
        dist.broadcast(agreed, src=0)
        step = int(agreed.item())
    if step == 0:
        return checkpoint  # none, or one not named by this module
    if checkpoint is not None and checkpoint.path.rstrip("/").endswith(_checkpoint_dir_name(step)):
        return checkpoint
    storage_path, filesystem = _ray_storage(storage)
    return ray.train.Checkpoint(path=f"{storage_path}/{run_name}/{_checkpoint_dir_name(step)}", filesystem=filesystem)


def _validation_key(run_name: str, step: int, seed: int) -> str:
    return f"{run_prefix(run_name)}validation/step-{step:06d}/seed-{seed}.png"


def _render(pipe, prompt: str, seeds: list[int], config: TrainConfig, autocast) -> list:
    import torch

    with autocast():
        return pipe(prompt=[prompt] * len(seeds), num_inference_steps=config.validation_inference_steps,
                    width=config.resolution, height=config.resolution,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]).images


def _store_validation(storage: Storage, run_name: str, step: int, seeds: list[int], images: list) -> list[dict]:
    out = []
    for seed, image in zip(seeds, images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = storage.put_bytes(_validation_key(run_name, step, seed), buffer.getvalue(), "image/png")
        out.append({"step": step, "seed": seed, "key": key})
    return out


def _finalize(models: _Models, config: TrainConfig, plan: TrainPlan, storage: Storage, metrics: dict,
              device, autocast) -> dict:
    """Rank 0, after the last checkpoint: save the adapter, render with it, register it."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    registry = LoraRegistry(storage)
    done = registry.find_by_run(config.name, plan.run_name)  # a retried finalize registers once
    if done is not None:
        return {"lora": done.model_dump(mode="json"), "metrics": done.manifest.metrics}

    with tempfile.TemporaryDirectory() as folder:
        # 1. The adapter, in diffusers' format (as train_dreambooth_lora_sdxl.py saves it).
        layers: dict[str, Any] = {
            "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet)),
            "unet_lora_adapter_metadata": models.unet.peft_config["default"].to_dict()}
        if config.train_text_encoder:
            for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders):
                layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
                layers[f"{name}_lora_adapter_metadata"] = encoder.peft_config["default"].to_dict()
        StableDiffusionXLPipeline.save_lora_weights(folder, **layers)

        # 2. Validation images with the saved file loaded into a fresh pipeline, as a server loads it.
        pipe = StableDiffusionXLPipeline.from_pretrained(config.base_model, torch_dtype=models.weight_dtype,
                                                         vae=models.vae).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(folder, adapter_name="trained")
        images = _render(pipe, plan.validation_prompt, config.validation_seeds, config, autocast)
        _store_validation(storage, plan.run_name, metrics["step"], config.validation_seeds, images)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

        # 3. Manifest, and registration.
        validation = []
        for key in storage.list(f"{run_prefix(plan.run_name)}validation/"):
            step_part, seed_part = key.split("/")[-2:]
            validation.append({"step": int(step_part.removeprefix("step-")),
                               "seed": int(seed_part.removeprefix("seed-").removesuffix(".png")), "key": key})
        manifest = LoraManifest(
            base_model=config.base_model, method=config.method, trigger_word=plan.trigger_word, rank=config.rank,
            alpha=config.lora_alpha, target_modules=config.target_modules,
            train_text_encoder=config.train_text_encoder, dataset_id=plan.dataset_id,
            dataset_version=plan.dataset_version, hyperparameters={**config.hyperparameters(),
                                                                   "total_steps": plan.total_steps},
            metrics=metrics, validation_prompt=plan.validation_prompt, validation_seeds=config.validation_seeds,
            validation_images=validation, training_run=plan.run_name)
        record = registry.register(config.name, manifest, folder, new_version=config.new_version)
    return {"lora": record.model_dump(mode="json"), "metrics": metrics}


def _train_loop(loop_config: dict) -> dict | None:
    """Runs on every Ray Train worker."""
    import contextlib

    import ray.train
    import ray.train.torch
    import torch
    from diffusers.optimization import get_scheduler

    config = TrainConfig.model_validate(loop_config["config"])
    plan = TrainPlan.model_validate(loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    storage = Storage(config.storage_root, config.storage_options)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    if weight_dtype is torch.float32:
        autocast = contextlib.nullcontext
    else:
        autocast = partial(torch.autocast, device_type=device.type, dtype=weight_dtype)

    # 1. Models, with LoRA layers initialised from the same seed on every rank.
    torch.manual_seed(config.seed)
    models = _load_models(config, device, weight_dtype)
    trainable = _add_lora(models, config)
    groups = [{"params": list(trainable["unet"].values()), "lr": config.learning_rate}]
    if config.train_text_encoder:
        groups.append({"params": [p for m in ("text_encoder", "text_encoder_2") for p in trainable[m].values()],
                       "lr": config.text_encoder_learning_rate or config.learning_rate})
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=plan.total_steps)
    scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None

    # 2. Resume from the latest checkpoint: after a worker failure, or a re-run of the same run name.
    state = {"step": 0, "resumed_from_steps": [], "loss": None}
    checkpoint = _latest_checkpoint(storage, plan.run_name, rank, world, device)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _load_checkpoint(folder, trainable, optimizer, lr_scheduler, scaler)
        state["resumed_from_steps"] = state.get("resumed_from_steps", []) + [state["step"]]
    state["config"] = resume_record(config, plan)  # check_resume compares a later run against it
    _broadcast_from_rank0(params, world)
    step = start_step = state["step"]
    torch.manual_seed(config.seed + 1_000_003 * (rank + 1) + start_step)  # per-rank noise, new after a resume
    status = None
    if rank == 0:
        status = _StatusWriter(storage, config.name, plan.run_name)
        status.update(state="training", step=step, total_steps=plan.total_steps,
                      resumed_from_step=start_step if checkpoint is not None else None)
        if checkpoint is not None:
            print(f"[{plan.run_name}] resumed from checkpoint at step {start_step}", flush=True)

    # 3. Train.
    shard = ray.train.get_dataset_shard("train")
    class_shard = ray.train.get_dataset_shard("class") if config.method == "dreambooth" else None
    batches = _batches(models, shard, class_shard, config, device, rank, first_epoch=step // plan.steps_per_epoch)
    samples_per_step = config.batch_size * config.gradient_accumulation * world
    fail_at = loop_config.get("fail_at")
    fail_marker = f"{run_prefix(plan.run_name)}fault-injected"
    recent_losses: list[float] = []
    timed_steps, timed_seconds, epoch = 0, 0.0, step // plan.steps_per_epoch
    models.unet.train()
    while step < plan.total_steps:
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(config.gradient_accumulation):
            batch, epoch = next(batches)
            loss = _loss(models, batch, config, device, autocast) / config.gradient_accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
            step_loss += loss.detach()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        _all_reduce_mean(grads + [step_loss], world)  # data parallel: every rank applies the mean gradient
        for p, g in zip(params, grads):
            p.grad = g
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        if step > start_step + 1:  # the first step of an attempt pays for warm-up; leave it out
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + elapsed
        loss_value = float(step_loss)
        recent_losses = (recent_losses + [loss_value])[-20:]
        metrics = {
            "step": step, "total_steps": plan.total_steps, "epoch": epoch, "loss": loss_value,
            "loss_avg": sum(recent_losses) / len(recent_losses), "learning_rate": lr_scheduler.get_last_lr()[0],
            "samples_per_s": samples_per_step * timed_steps / timed_seconds if timed_seconds else None,
            "workers": world, "resumed_from_steps": state["resumed_from_steps"],
        }

        if fail_at and rank == fail_at[0] and step == fail_at[1] and not storage.exists(fail_marker):
            storage.put_bytes(fail_marker, b"1")
            print(f"[{plan.run_name}] worker {rank}: injected failure at step {step}", flush=True)
            os._exit(1)

        if rank == 0:
            rate = f"{metrics['samples_per_s']:.2f} samples/s" if metrics["samples_per_s"] else "warming up"
            print(f"[{plan.run_name}] step {step}/{plan.total_steps} loss {loss_value:.4f} "
                  f"lr {metrics['learning_rate']:.2e} {rate}", flush=True)
            status.update(step=step, epoch=epoch, loss=loss_value, learning_rate=metrics["learning_rate"],
                          samples_per_s=metrics["samples_per_s"])
            if config.validation_every_steps and step % config.validation_every_steps == 0 and step < plan.total_steps:
                images = _render(models.pipe, plan.validation_prompt, config.validation_seeds, config, autocast)
                _store_validation(storage, plan.run_name, step, config.validation_seeds, images)
                models.unet.train()

        if step % config.checkpoint_every_steps == 0 or step == plan.total_steps:
            state = {**state, "step": step, "loss": loss_value, "metrics": metrics}
            with tempfile.TemporaryDirectory() as folder:
                if rank == 0:
                    _save_checkpoint(folder, trainable, optimizer, lr_scheduler, scaler, state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                                     checkpoint_dir_name=_checkpoint_dir_name(step))
                    status.update(checkpoint_step=step)  # uploaded: report returns after the upload
                else:
                    ray.train.report(metrics)

    # 4. Save, render, register (rank 0).
    if rank != 0:
        return None
    final = dict(state.get("metrics") or {})
    final.update(step=step, resumed_from_steps=state["resumed_from_steps"])
    if timed_seconds:
        final["samples_per_s"] = samples_per_step * timed_steps / timed_seconds
    status.update(state="finalizing", step=step)
    return _finalize(models, config, plan, storage, final, device, autocast)


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.lora", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML or JSON file with a TrainConfig (a path or an fsspec URL)")
    source.add_argument("--config-json", help="the TrainConfig as a JSON string")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field (VALUE is parsed as YAML)")
    parser.add_argument("--check", action="store_true", help="check the config and print the plan; do not train")
    args = parser.parse_args(argv)

    import yaml

    overrides = {}
    for item in args.set:
        field, _, value = item.partition("=")
        overrides[field] = yaml.safe_load(value)
    try:
        config = load_config(json.loads(args.config_json) if args.config_json else args.config, **overrides)
        if args.check:
            print(check_inputs(config).model_dump_json(indent=2))
            return 0
        result = train(config)
    except TrainConfigError as exc:
        print(json.dumps({"error": {"type": "invalid_request_error", "message": exc.message, "param": exc.param}}),
              file=sys.stderr)
        return 2
    print(json.dumps({"run_name": result.run_name, "lora": result.lora.id, "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
