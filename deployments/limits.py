"""What the models' contracts share, without torch or diffusers: the seed range, and reading a
diffusers pipeline's config files (a limit the weights decide, such as SVD's frame count or the
upscaler's factor, is read from a local model folder when the app is built; for a hub id it is a
setting of the model's config)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_SEED = 2**32 - 1


def pipeline_json(source: str, filename: str) -> dict | None:
    """A JSON file of a diffusers pipeline (`model_index.json`, `unet/config.json`, ...) in the local
    folder `source`, without loading it. None for a hub id or a missing file: building the app never
    reaches the hub, so a limit the weights decide is then a setting of the model's config."""
    path = Path(source) / filename
    return json.loads(path.read_text()) if path.is_file() else None
