"""Small media builders shared by the unit and serve tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG of seeded noise: distinct per seed (so never a duplicate), same bytes for the same seed."""
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return png_bytes(Image.fromarray(array.squeeze() if channels == 1 else array, mode))
