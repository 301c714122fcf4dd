"""MP4 encoding and decoding: H.264 in yuv420p, frame count, size, fps, limits."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
from PIL import Image

from deployments.errors import InvalidRequestError
from deployments.media import decode_mp4, encode_mp4


def gradient_frames(count: int, width: int = 64, height: int = 48) -> np.ndarray:
    # Smooth content: H.264 at crf 18 keeps it within a few levels, unlike noise.
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([np.stack([x, y, np.full_like(x, 30 * i)], -1) for i in range(count)]).astype(np.uint8)


def stream_info(data: bytes) -> dict:
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "v.mp4")
        with open(path, "wb") as f:
            f.write(data)
        reader = imageio_ffmpeg.read_frames(path)
        try:
            return next(reader)
        finally:
            reader.close()


def test_round_trip_keeps_frames_size_and_fps():
    frames = gradient_frames(5)
    data = encode_mp4(frames, 8)
    assert data[4:8] == b"ftyp"
    info = stream_info(data)
    assert info["codec"] == "h264" and info["pix_fmt"].startswith("yuv420p")

    decoded, fps = decode_mp4(data)
    assert len(decoded) == 5 and fps == 8.0
    assert all(frame.size == (64, 48) and frame.mode == "RGB" for frame in decoded)
    error = np.abs(np.stack([np.asarray(f) for f in decoded]).astype(np.int16) - frames).mean()
    assert error < 4, error


def test_pil_frames_and_float_arrays_encode_alike():
    frames = gradient_frames(3)
    from_pil = encode_mp4([Image.fromarray(f) for f in frames], 12)
    from_float = encode_mp4(frames.astype(np.float32) / 255.0, 12)
    assert from_pil == from_float  # same pixels, same settings: same bytes


def test_encoding_is_deterministic():
    frames = gradient_frames(4)
    assert encode_mp4(frames, 7) == encode_mp4(frames, 7)


def test_even_sides_off_the_16_pixel_grid_are_kept_exactly():
    # imageio would rescale to a multiple of 16 by default; SVD sizes are multiples of 8 only.
    decoded, _ = decode_mp4(encode_mp4(gradient_frames(3, width=72, height=40), 6))
    assert len(decoded) == 3 and all(frame.size == (72, 40) for frame in decoded)


def test_odd_sides_are_padded_to_even():
    decoded, _ = decode_mp4(encode_mp4(gradient_frames(2, width=33, height=21), 5))
    assert decoded[0].size == (34, 22)


@pytest.mark.parametrize("fps", [1, 25, 60])
def test_fps_is_kept(fps):
    _, decoded_fps = decode_mp4(encode_mp4(gradient_frames(2, 16, 16), fps))
    assert decoded_fps == fps


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_mp4([], 8)
    with pytest.raises(ValueError):
        encode_mp4([Image.new("RGB", (16, 16)), Image.new("RGB", (32, 16))], 8)
    with pytest.raises(ValueError):
        encode_mp4(gradient_frames(2), 0)


@pytest.mark.parametrize("data", [b"", b"not a video at all" * 50])
def test_decode_rejects_unreadable_data(data):
    with pytest.raises(InvalidRequestError) as raised:
        decode_mp4(data, "video_in")
    assert raised.value.param == "video_in"


def test_decode_limits_frames_and_pixels():
    data = encode_mp4(gradient_frames(6, 32, 32), 8)
    assert len(decode_mp4(data, max_frames=6)[0]) == 6
    with pytest.raises(InvalidRequestError, match="more than 5 frames") as raised:
        decode_mp4(data, max_frames=5)
    assert raised.value.param == "video"
    with pytest.raises(InvalidRequestError, match="pixels"):
        decode_mp4(data, max_pixels=32 * 31)
