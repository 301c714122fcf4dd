"""Image encoding, decoding and checks shared by the deployments and the ingress."""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

from deployments.errors import InvalidRequestError

_SIZE_RE = re.compile(r"^(\d{1,6})x(\d{1,6})$")


def parse_size(size: str, param: str = "size") -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height); shape only, limits are the model's to check."""
    match = _SIZE_RE.match(size.strip()) if isinstance(size, str) else None
    if not match:
        raise InvalidRequestError(f"{param} must look like 'WIDTHxHEIGHT', e.g. '1024x1024'; got {size!r}", param)
    return int(match.group(1)), int(match.group(2))


def check_size(width: int, height: int, *, min_size: int, max_size: int, multiple: int = 8, param: str = "size") -> None:
    for side in (width, height):
        if side % multiple:
            raise InvalidRequestError(f"{param} sides must be multiples of {multiple}; got {width}x{height}", param)
        if not min_size <= side <= max_size:
            raise InvalidRequestError(
                f"{param} sides must be between {min_size} and {max_size} pixels; got {width}x{height}", param
            )


def encode_png(image: Image.Image, text: dict[str, str] | None = None) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    # compress_level 1: output is noise-like for tiny models and large for real ones; speed wins.
    image.save(buffer, format="PNG", pnginfo=info, compress_level=1)
    return buffer.getvalue()


def decode_image(data: bytes, param: str = "image", *, max_pixels: int | None = None, mode: str = "RGB") -> Image.Image:
    if not data:
        raise InvalidRequestError(f"{param} is empty", param)
    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise InvalidRequestError(
                f"{param} has {image.width}x{image.height} pixels, more than the limit of {max_pixels}", param
            )
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        if isinstance(exc, InvalidRequestError):
            raise
        raise InvalidRequestError(f"{param} is not a readable image (PNG, JPEG or WebP)", param) from exc
    return image.convert(mode)
