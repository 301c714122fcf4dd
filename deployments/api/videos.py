"""Videos (OpenAI Videos API shapes) and image upscaling."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["videos"])
