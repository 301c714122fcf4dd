"""Image and video encoding, decoding and checks shared by the deployments and the ingress."""

from __future__ import annotations

import io
import os
import re
import tempfile
from fractions import Fraction
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from deployments.errors import InvalidRequestError

_SIZE_RE = re.compile(r"^(\d{1,6})x(\d{1,6})$")

# imageio-ffmpeg starts ffmpeg with preexec_fn=os.setpgrp, which runs Python in the forked child:
# in a process with Ray's gRPC threads (every replica, and a test driver joined to Ray) the child
# sometimes dies before exec ("Broken pipe" writing frames, or no header within its 10 s), seen in
# the serve suite and in CI. The library's own switch (its issue #58) makes it a plain fork+exec;
# the cost is that a Ctrl-C in a terminal also reaches ffmpeg, which a server never sees.
os.environ.setdefault("IMAGEIO_FFMPEG_NO_PREVENT_SIGINT", "1")


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


# The formats an input image may have; Image.open tries no other decoder (EPS would run
# Ghostscript, and each extra decoder is attack surface).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_image(data: bytes, param: str = "image", *, max_pixels: int | None = None, mode: str = "RGB") -> Image.Image:
    """Decode an input image; a 400 naming `param` if it is not one.

    With `max_pixels`, the size is read from the header (Image.open reads no pixel data) and an
    image over the limit is refused before anything is decoded: a small, highly compressed PNG of
    8192x8192 pixels (a decompression bomb) costs its header, not 200 MB.
    """
    if not data:
        raise InvalidRequestError(f"{param} is empty", param)
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
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


def _as_rgb_arrays(frames: Sequence[Image.Image] | np.ndarray) -> list[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be an array of shape (frames, height, width, 3); got {frames.shape}")
        if frames.dtype != np.uint8:  # float frames in [0, 1], as diffusers' output_type="np" gives them
            frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
        return list(frames)
    return [np.asarray(frame.convert("RGB")) for frame in frames]


def encode_mp4(
    frames: Sequence[Image.Image] | np.ndarray, fps: float, *, crf: int = 18, preset: str = "medium"
) -> bytes:
    """H.264 (libx264, yuv420p) MP4 of RGB frames, playable in browsers and QuickTime.

    yuv420p needs even sides: an odd width or height is padded by repeating the last column or
    row. `+faststart` puts the index first so a player can start before the download ends.
    """
    import imageio_ffmpeg

    arrays = _as_rgb_arrays(frames)
    if not arrays:
        raise ValueError("a video needs at least one frame")
    height, width = arrays[0].shape[:2]
    if any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("all frames must have the same size")
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}")
    if height % 2 or width % 2:
        arrays = [np.pad(a, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge") for a in arrays]
    with tempfile.TemporaryDirectory(prefix="atelier-mp4-") as folder:
        # The MP4 index is written after the frames, so ffmpeg needs a seekable file, not a pipe.
        path = os.path.join(folder, "video.mp4")
        writer = imageio_ffmpeg.write_frames(
            path,
            (arrays[0].shape[1], arrays[0].shape[0]),
            fps=Fraction(fps).limit_denominator(1001),
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,  # rate control is the -crf below
            macro_block_size=1,  # never let imageio rescale; sides are already even
            ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-preset", preset, "-movflags", "+faststart"],
        )
        writer.send(None)
        for array in arrays:
            writer.send(np.ascontiguousarray(array))
        writer.close()
        with open(path, "rb") as f:
            return f.read()


def decode_mp4(
    data: bytes, param: str = "video", *, max_frames: int | None = None, max_pixels: int | None = None
) -> tuple[list[Image.Image], float]:
    """(RGB frames, fps) of a video (MP4, or anything ffmpeg reads); limits are checked while decoding."""
    import imageio_ffmpeg

    if not data:
        raise InvalidRequestError(f"{param} is empty", param)
    with tempfile.TemporaryDirectory(prefix="atelier-mp4-") as folder:
        path = os.path.join(folder, "video.mp4")
        with open(path, "wb") as f:
            f.write(data)
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        try:
            try:
                meta = next(reader)
            except (OSError, RuntimeError, StopIteration) as exc:
                raise InvalidRequestError(f"{param} is not a readable video (MP4)", param) from exc
            width, height = meta["size"]
            if max_pixels is not None and width * height > max_pixels:
                raise InvalidRequestError(
                    f"{param} frames have {width}x{height} pixels, more than the limit of {max_pixels}", param
                )
            frames = []
            try:
                for raw in reader:
                    if max_frames is not None and len(frames) >= max_frames:
                        raise InvalidRequestError(f"{param} has more than {max_frames} frames", param)
                    frames.append(Image.frombytes("RGB", (width, height), raw))
            except RuntimeError as exc:
                raise InvalidRequestError(f"{param} is truncated or corrupt", param) from exc
        finally:
            reader.close()
    if not frames:
        raise InvalidRequestError(f"{param} has no frames", param)
    if not meta.get("fps"):
        raise InvalidRequestError(f"{param} has no frame rate", param)
    return frames, float(meta["fps"])


# --- chained clips (long videos) -------------------------------------------------------------------


def crossfade(tail: np.ndarray, head: np.ndarray) -> np.ndarray:
    """A linear crossfade of two runs of k frames (the end of one clip, the start of the next):
    frame j is (1 - w)·tail[j] + w·head[j] with w = (j + 1) / (k + 1), so the weights step evenly
    from the old clip to the new one and neither run is shown alone inside the overlap."""
    if tail.shape != head.shape:
        raise ValueError(f"crossfaded frames must have the same shape; got {tail.shape} and {head.shape}")
    k = len(tail)
    weights = (np.arange(1, k + 1, dtype=np.float32) / (k + 1)).reshape(k, *([1] * (tail.ndim - 1)))
    blended = (1.0 - weights) * tail.astype(np.float32) + weights * head.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8) if tail.dtype == np.uint8 else blended.astype(tail.dtype)


def join_clips(clips: Sequence[np.ndarray], overlap: int) -> np.ndarray:
    """Clips of shape (frames, height, width, 3) joined into one run of frames: each clip after the
    first overlaps the frames so far by `overlap` frames, crossfaded (`crossfade`). The result has
    sum(len(clip)) - overlap·(len(clips) - 1) frames."""
    if not clips:
        raise ValueError("join_clips needs at least one clip")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0; got {overlap}")
    parts, last = [], clips[0]
    for clip in clips[1:]:
        if clip.shape[1:] != last.shape[1:]:
            raise ValueError(f"all clips must have the same frame size; got {last.shape[1:]} and {clip.shape[1:]}")
        if overlap > min(len(last), len(clip)):
            raise ValueError(f"overlap {overlap} is longer than a clip ({min(len(last), len(clip))} frames)")
        # What is settled is kept; the end of the frames so far is faded into the start of the next clip.
        cut = len(last) - overlap
        parts.append(last[:cut])
        last = np.concatenate([crossfade(last[cut:], clip[:overlap]), clip[overlap:]])
    parts.append(last)
    return np.concatenate(parts)
