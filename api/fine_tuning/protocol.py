"""The fine-tuning API's request and response types (OpenAI's fine-tuning shapes, plus Atelier's extras)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


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
    public: bool = Field(False, description="Register the LoRA as usable and listed for every key (read-only); "
                                            "default: only the owner's keys see it.")
    seed: int | None = None
    validation_file: str | None = None
    metadata: dict[str, str] | None = None


class FineTuningError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningValidationImage(BaseModel):
    """An image the run rendered with its adapter, at the validation prompt and one of its seeds."""

    step: int = Field(description="The optimizer step it was rendered at (the last step: the final adapter).")
    seed: int
    file: str = Field(description="Its name in result_files.")
    url: str = Field(description="GET it here (PNG): /v1/fine_tuning/jobs/{id}/files?name={file}.")


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
    epoch: int | None = Field(None, description="The epoch the last step was in (1 = the first), as the plan "
                                                "counts steps per epoch; None before the first step.")
    epochs: int | None = Field(None, description="Epochs the run makes (total_steps over steps per epoch).")
    learning_rate: float | None = Field(None, description="The learning rate of the last step (after the "
                                                          "scheduler).")
    samples_per_s: float | None = Field(None, description="Training images per second over the run's steps so "
                                                          "far (all workers, without the first step's warm-up).")
    validation_prompt: str | None = None
    validation_images: list[FineTuningValidationImage] = Field(
        default_factory=list, description="Rendered with the adapter during and at the end of the run; the same "
                                          "files are listed in result_files.")


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
