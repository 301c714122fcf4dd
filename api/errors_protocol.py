"""The one error shape every error leaves in: {"error": {"type", "message", "param"}}."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = Field(None, description="OpenAI's error code, where there is one (content_policy_violation).")
    category: str | None = Field(None, description="A moderation refusal's policy category.")


class ErrorResponse(BaseModel):
    error: ErrorDetail
