"""The workflows API's request and response types (the workflow document itself is graphs/workflows.py's)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from storage.workflows import SavedWorkflow

__all__ = ["WorkflowRunRequest", "SavedWorkflowBody", "SavedWorkflow"]


class WorkflowRunRequest(BaseModel):
    model_config = {"extra": "forbid"}

    workflow: dict[str, Any] | None = Field(None, description="An inline workflow document.")
    workflow_id: str | None = Field(None, description="A saved workflow; runs its `version` (default latest).")
    version: int | None = Field(None, ge=1)
    use_cache: bool = Field(True, description="Reuse a node's stored output when its inputs and params match.")


class SavedWorkflowBody(BaseModel):
    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, max_length=200)
    description: str = Field("", max_length=4000)
    workflow: dict[str, Any]
