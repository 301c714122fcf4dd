"""The one error shape every error leaves in: {"error": {"type", "message", "param"}}."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
