"""Fixed media pipelines run as jobs: text-to-image-hd, image-to-video, text-to-video."""

from __future__ import annotations

from typing import Any, Callable

VIDEO_PIPELINES: dict[str, Callable[..., None]] = {}
