"""GET /v1/models: model cards (base models and registered LoRAs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "atelier"
    kind: str
    capabilities: list[str] = []
    metadata: dict[str, Any] = {}


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- videos (OpenAI's Videos API shapes) and upscaling -----------------------------------------
