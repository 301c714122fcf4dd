"""Presets users make: image styles (a prompt template, negative prompt, size, steps, guidance,
category) and video settings (length in seconds or frames, rate, motion, size, steps), one JSON record each, per owner.

    presets/<owner tag or "_local">/<name>.json

Built-in styles (configs/styles.yaml) are not stored here; the API lists them beside these,
read-only.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from storage.fs import ObjectNotFoundError, Storage
from storage.keys import owner_tag, validate_id

__all__ = ["Preset", "PresetStore", "PresetNotFoundError", "PresetExistsError", "PRESETS_PREFIX"]

PRESETS_PREFIX = "presets/"


class Preset(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["image", "video"] = "image"
    category: str | None = Field(None, max_length=64, description="For grouping in the UI (e.g. portrait, product).")
    description: str = Field("", max_length=500)
    # image: a style
    prompt: str | None = Field(None, max_length=2000, validate_default=True,
                               description="Image presets: the template; {prompt} is the user's prompt.")
    negative_prompt: str | None = Field(None, max_length=2000)
    size: str | None = Field(None, pattern=r"^\d{2,5}x\d{2,5}$", description="Default WIDTHxHEIGHT.")
    steps: int | None = Field(None, ge=1, le=500)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    # video: motion
    seconds: float | None = Field(None, gt=0, le=60)
    fps: int | None = Field(None, ge=1, le=60)
    num_frames: int | None = Field(None, ge=1, le=3600, description=(
        "Video presets: the length in frames (one clip: up to the model's max_num_frames), instead of "
        "seconds; with both, seconds x fps must round to it."))
    motion_bucket_id: int | None = Field(None, ge=0, le=255)
    noise_aug_strength: float | None = Field(None, ge=0, le=1)
    owner: str | None = None
    created_at: float = Field(default_factory=time.time)
    builtin: bool = False

    @field_validator("prompt")
    @classmethod
    def _template(cls, prompt: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "image" and prompt is None:
            raise ValueError("an image preset needs a prompt template (with {prompt})")
        if prompt is not None and "{prompt}" not in prompt:
            raise ValueError("a preset's prompt template must contain {prompt}")
        return prompt

    @field_validator("prompt", "negative_prompt", "guidance_scale", "seconds", "fps", "num_frames",
                     "motion_bucket_id", "noise_aug_strength")
    @classmethod
    def _of_its_kind(cls, value, info: ValidationInfo):
        kind = info.data.get("kind")
        image_only = info.field_name in ("prompt", "negative_prompt", "guidance_scale")
        if value is not None and kind is not None and (kind == "image") != image_only:
            raise ValueError(f"{info.field_name} is not a setting of a {kind} preset")
        return value

    @field_validator("num_frames")
    @classmethod
    def _agrees_with_seconds(cls, num_frames: int | None, info: ValidationInfo) -> int | None:
        seconds, fps = info.data.get("seconds"), info.data.get("fps")
        if num_frames is None or seconds is None:
            return num_frames
        if fps is None:
            raise ValueError("give either seconds or num_frames; with both, give fps too so that they can agree")
        if round(seconds * fps) != num_frames:
            raise ValueError(f"{num_frames} frames disagree with seconds={seconds:g} at {fps} fps "
                             f"({round(seconds * fps)} frames); give one of them, or matching values")
        return num_frames

    def apply(self, prompt: str) -> str:
        return (self.prompt or "{prompt}").replace("{prompt}", prompt)


class PresetNotFoundError(LookupError):
    pass


class PresetExistsError(ValueError):
    pass


class PresetStore:
    def __init__(self, storage: Storage):
        self.storage = storage

    @staticmethod
    def key(owner: str | None, name: str) -> str:
        return f"{PRESETS_PREFIX}{owner_tag(owner) or '_local'}/{validate_id(name, 'preset name')}.json"

    def get(self, owner: str | None, name: str) -> Preset:
        try:
            return Preset.model_validate(self.storage.get_json(self.key(owner, name)))
        except (ObjectNotFoundError, ValueError):
            raise PresetNotFoundError(name) from None

    def list(self, owner: str | None) -> list[Preset]:
        prefix = f"{PRESETS_PREFIX}{owner_tag(owner) or '_local'}/"
        out = []
        for key in self.storage.list(prefix):
            try:
                out.append(Preset.model_validate(self.storage.get_json(key)))
            except (ObjectNotFoundError, ValueError):
                continue
        return sorted(out, key=lambda p: p.name)

    def create(self, preset: Preset) -> Preset:
        data = preset.model_dump_json().encode()
        if not self.storage.put_if_absent(self.key(preset.owner, preset.name), data, "application/json"):
            raise PresetExistsError(preset.name)
        return preset

    def replace(self, preset: Preset) -> Preset:
        self.get(preset.owner, preset.name)
        self.storage.put_json(self.key(preset.owner, preset.name), preset.model_dump(mode="json"))
        return preset

    def delete(self, owner: str | None, name: str) -> None:
        self.get(owner, name)
        self.storage.delete(self.key(owner, name))
