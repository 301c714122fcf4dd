"""Prompts and style presets (prompt template, negative prompt, defaults) loaded from YAML.

Shared by the image model (SDXL) and the language model's prompt refinement, which write for the
same prompts and styles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, Field, field_validator

DEFAULT_STYLES_FILE = Path(__file__).resolve().parents[1] / "configs" / "styles.yaml"


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be empty")
    return prompt


# An image prompt, as every request that carries one takes it.
Prompt = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_check_prompt)]


class StylePreset(BaseModel):
    prompt: str = Field(description="Template; {prompt} is replaced by the user's prompt.")
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0)

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("a style's prompt template must contain {prompt}")
        return template

    def apply(self, prompt: str) -> str:
        return self.prompt.replace("{prompt}", prompt)


def load_styles(path: str | Path | None = None) -> dict[str, StylePreset]:
    raw = yaml.safe_load(Path(path or DEFAULT_STYLES_FILE).read_text()) or {}
    return {name: StylePreset.model_validate(spec) for name, spec in raw.items()}
