"""The configuration of a LoRA / DreamBooth fine-tuning run (:mod:`training.loop`).

    config = load_config("cfg.yaml")            # or TrainConfig(name=..., base_model=..., ...)
    config = load_config({"name": "corgi", ...})

Field checks that need nothing but the values happen here; a failed check raises
:class:`TrainConfigError` whose ``param`` is the field's name (what an HTTP API reports), and a
plain ``TrainConfig(...)`` raises a pydantic ValidationError located at that field. Checks
against storage (unknown dataset or base model, too few images, a taken name) are in
:func:`training.plan.check_inputs`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from storage.keys import validate_id

__all__ = ["TrainConfig", "TrainConfigError", "load_config", "config_error", "instance_caption", "LR_SCHEDULERS",
           "RESUME_FIELDS", "DEFAULT_TARGET_MODULES", "TEXT_ENCODER_TARGET_MODULES", "STORAGE_OPTIONS_ENV"]

# A Ray job's storage_options (JSON): its runtime_env carries them, never its entrypoint (training.cli reads them).
STORAGE_OPTIONS_ENV = "ATELIER_STORAGE_OPTIONS"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# The attention projections, as diffusers' train_dreambooth_lora_sdxl.py targets them.
DEFAULT_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_ENCODER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# What a checkpoint records of its run's config, and a run resuming it must match: the adapter's
# shapes, the data and the optimisation. Length (max_steps, epochs), workers and validation may
# change between attempts.
RESUME_FIELDS = (
    "base_model", "method", "rank", "alpha", "target_modules", "train_text_encoder", "resolution", "min_size",
    "instance_prompt", "class_prompt", "prior_loss_weight", "learning_rate", "text_encoder_learning_rate",
    "lr_scheduler", "lr_warmup_steps", "batch_size", "gradient_accumulation", "mixed_precision", "seed",
)


class TrainConfigError(ValueError):
    """A bad training configuration; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


# Hard ceilings for any run (an app's `ingress.fine_tuning.limits` sets lower ones for HTTP requests).
MAX_RANK = 1024
MAX_RESOLUTION = 4096
MAX_STEPS = 10_000_000
MAX_EPOCHS = 100_000
MAX_LEARNING_RATE = 1.0  # AdamW steps of this size already wreck the weights; more is a typo (1 for 1e-4)


class TrainConfig(BaseModel):
    # Every float field must be a finite number: a JSON body may carry Infinity or NaN, which
    # would pass `gt=0` (inf) or train nothing but NaNs.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # --- what to train ------------------------------------------------------------------------
    name: str = Field(description="Name the adapter is registered under (letters, digits, '_', '.', '-').")
    base_model: str = Field(description="Folder or hub id of an SDXL base pipeline (diffusers layout).")
    dataset_id: str = Field(description="Dataset id (or name) in the storage root.")
    dataset_version: int | None = Field(None, ge=1, description="Default: the latest version.")
    method: Literal["lora", "dreambooth"] = "lora"
    trigger_word: str | None = Field(None, max_length=100, description="Default: the dataset's trigger word.")
    instance_prompt: str | None = Field(
        None, max_length=1000, description="Caption for images without one; with dreambooth, for every image. "
                                           "'{trigger_word}' is substituted.")
    class_prompt: str | None = Field(None, max_length=1000, validate_default=True,
                                     description="dreambooth: prompt of the class images.")
    num_class_images: int = Field(100, ge=1, le=10_000)
    prior_loss_weight: float = Field(1.0, ge=0)
    class_inference_steps: int = Field(25, ge=1, le=200, description="Denoising steps per class image.")

    # --- adapter ------------------------------------------------------------------------------
    rank: int = Field(4, le=MAX_RANK, description="LoRA rank (> 0).")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default: the rank (scale 1).")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    train_text_encoder: bool = Field(False, description="Also train LoRA on both text encoders.")

    # --- optimisation -------------------------------------------------------------------------
    learning_rate: float = Field(1e-4, description="> 0 and at most MAX_LEARNING_RATE")
    text_encoder_learning_rate: float | None = Field(None, gt=0, description="Default: learning_rate.")
    lr_scheduler: Literal[LR_SCHEDULERS] = "constant"  # type: ignore[valid-type]
    lr_warmup_steps: int = Field(0, ge=0, validate_default=True)
    batch_size: int = Field(1, ge=1, le=256, description="Images per worker per micro-batch.")
    gradient_accumulation: int = Field(1, ge=1, le=1024)
    epochs: int | None = Field(None, ge=1, le=MAX_EPOCHS)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, validate_default=True,
                                  description="Optimizer steps; wins over epochs when both are set.")
    resolution: int = Field(1024, le=MAX_RESOLUTION, description="Training side in pixels (a multiple of 8).")
    min_size: int = Field(0, ge=0, description="Images with a shorter side below this are left out.")
    min_images: int = Field(1, ge=1, description="Refuse to train on fewer images than this.")
    use_gpu: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description="fp16/bf16 need use_gpu.")
    gradient_checkpointing: bool = False
    cache_latents: bool = Field(False, description="Encode each image (and caption) once; later epochs reuse it.")
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=2**32 - 1)

    # --- Ray Train ----------------------------------------------------------------------------
    num_workers: int = Field(1, ge=1, le=1024)
    cpus_per_worker: float = Field(1.0, gt=0)
    data_cpus: float = Field(1.0, gt=0, description="CPUs per Ray Data task reading and preparing images.")
    max_failures: int = Field(1, ge=-1, description="Worker-group restarts to recover from (-1: forever).")
    min_workers: int | None = Field(
        None, ge=1, description="Elastic training (Ray Train's ScalingConfig(num_workers=(min, max))): the run "
                                "starts or goes on with as few as this many workers when a node is lost, and "
                                "grows back to num_workers when capacity returns. None: a fixed num_workers.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the workers' bundles: SPREAD puts them on different nodes where it can.")
    checkpoint_every_steps: int = Field(100, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)

    # --- validation images --------------------------------------------------------------------
    validation_every_steps: int | None = Field(None, ge=1, description="Also render during training.")
    validation_prompt: str | None = Field(None, max_length=1000, description="Default: the instance caption.")
    validation_seeds: list[int] = Field(default_factory=lambda: [0], max_length=16)
    validation_inference_steps: int = Field(25, ge=1, le=200)

    # --- where ----------------------------------------------------------------------------------
    storage_root: str = "var/storage"
    # Credentials (an S3 key and secret): never dumped (a Ray job's entrypoint, a job record, Ray
    # Train's run state) nor shown (repr). A Ray job gets them in its environment (STORAGE_OPTIONS_ENV).
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False,
                                            description="fsspec/s3fs options of the storage root (credentials); "
                                                        "left out of every dump of the config.")
    new_version: bool = Field(False, description="Register as a new version if the name is taken.")
    owner: str | None = Field(None, description="The tenant the adapter is registered for (the API key's); a "
                                                "name another owner registered is refused.")
    public: bool = Field(False, description="Register the adapter as usable by every key (read-only).")
    run_name: str | None = Field(None, description="Training run folder; default: the name (name-v<N> for a "
                                                   "new version). Re-running a run name resumes it.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        validate_id(value, "name")
        if len(value) > 100:
            raise ValueError("name is longer than 100 characters")
        return value

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str | None) -> str | None:
        return None if value is None else validate_id(value, "run_name")

    @field_validator("rank")
    @classmethod
    def _check_rank(cls, value: int) -> int:
        if value <= 0:
            raise ValueError(f"rank must be greater than 0, got {value}")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _check_learning_rate(cls, value: float) -> float:
        if not 0 < value <= MAX_LEARNING_RATE:
            raise ValueError(f"learning_rate must be greater than 0 and at most {MAX_LEARNING_RATE:g}, got {value}")
        return value

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int) -> int:
        if value < 64 or value % 8:
            raise ValueError(f"resolution must be a multiple of 8 of at least 64, got {value}")
        return value

    @field_validator("trigger_word")
    @classmethod
    def _check_trigger_word(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\n" in value):
            raise ValueError("trigger_word must be non-blank text on one line")
        return value

    @field_validator("validation_seeds")
    @classmethod
    def _check_seeds(cls, value: list[int]) -> list[int]:
        if any(s < 0 or s > 2**32 - 1 for s in value):
            raise ValueError("validation seeds must be between 0 and 2**32 - 1")
        return value

    # Cross-field checks sit on the later field (``info.data`` holds the earlier ones), so the
    # error's location names the field to fix.

    @field_validator("class_prompt")
    @classmethod
    def _check_class_prompt(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("method") == "dreambooth" and (not value or not value.strip()):
            raise ValueError("dreambooth needs a class_prompt for its prior-preservation images")
        return value

    @field_validator("lr_warmup_steps")
    @classmethod
    def _check_warmup(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("lr_scheduler") == "constant_with_warmup" and value == 0:
            raise ValueError("constant_with_warmup needs lr_warmup_steps > 0")
        return value

    @field_validator("max_steps")
    @classmethod
    def _check_length(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is None and info.data.get("epochs") is None:
            raise ValueError("set max_steps or epochs")
        return value

    @field_validator("mixed_precision")
    @classmethod
    def _check_mixed_precision(cls, value: str, info: ValidationInfo) -> str:
        if value != "no" and not info.data.get("use_gpu"):
            raise ValueError(f"mixed_precision {value!r} needs use_gpu: true (CPU training runs in float32)")
        return value

    # --- derived ------------------------------------------------------------------------------

    def resume_fields(self) -> dict[str, Any]:
        """The fields a checkpoint of this run was trained with that a resumed run must share."""
        return self.model_dump(mode="json", include=set(RESUME_FIELDS))

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else float(self.rank)

    def hyperparameters(self) -> dict[str, Any]:
        """What a manifest records about how the adapter was trained."""
        return self.model_dump(mode="json", include={
            "method", "rank", "alpha", "target_modules", "train_text_encoder", "learning_rate",
            "text_encoder_learning_rate", "lr_scheduler", "lr_warmup_steps", "batch_size", "gradient_accumulation",
            "max_steps", "epochs", "resolution", "min_size", "mixed_precision", "gradient_checkpointing",
            "cache_latents", "max_grad_norm", "seed", "num_workers", "instance_prompt", "class_prompt",
            "num_class_images", "prior_loss_weight",
        })


def _load_file(path: str) -> dict:
    """A YAML or JSON file: a local path, or any fsspec URL (``s3://...``, credentials from the environment).
    ``${VARS}`` in it expand from the environment."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = os.path.expandvars(f.read())  # ${VARS} from the job's environment
    except FileNotFoundError:
        raise TrainConfigError(f"no config file at {path!r}", None) from None
    data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: a training config must be a mapping", None)
    return data


def load_config(source: TrainConfig | dict | str | os.PathLike, **overrides: Any) -> TrainConfig:
    """A TrainConfig from a model, a dict, or a YAML/JSON file; TrainConfigError names the field."""
    if isinstance(source, TrainConfig):
        data = {**source.model_dump(), "storage_options": source.storage_options}  # a dump leaves them out
    elif isinstance(source, dict):
        data = dict(source)
    else:
        data = _load_file(os.fspath(source))
    data.update(overrides)
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc) from None


def config_error(exc: ValidationError) -> TrainConfigError:
    """The first problem of a ValidationError as a TrainConfigError naming its field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return TrainConfigError(f"{field}: {message}" if field else message,
                            str(first["loc"][0]) if first["loc"] else None)


def instance_caption(instance_prompt: str | None, trigger_word: str | None) -> str | None:
    """The caption for images that have none: ``instance_prompt`` (``{trigger_word}`` is
    substituted), made to contain the trigger word; ``"a photo of <trigger>"`` by default."""
    if instance_prompt is None:
        return f"a photo of {trigger_word}" if trigger_word else None
    prompt = instance_prompt.replace("{trigger_word}", trigger_word or "").strip()
    if trigger_word and trigger_word not in prompt:
        prompt = f"{trigger_word}, {prompt}" if prompt else trigger_word
    return prompt
