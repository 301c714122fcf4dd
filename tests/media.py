"""Small media builders shared by the unit and serve tests."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
from collections.abc import Iterator

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


@contextlib.contextmanager
def noise_image_server(size: int = 24) -> Iterator[str]:
    """A loopback HTTP server whose `/<seed>.png` is `noise_image(size, size, seed)`; yields its URL."""

    class Images(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = noise_image(size, size, seed=int(self.path.strip("/").split(".")[0]))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
