"""BodySizeLimitMiddleware's early 413 (a Content-Length over the limit): the client's body is read
and dropped first (up to a bound), so a client still uploading gets the 413, not a reset."""

from __future__ import annotations

import asyncio
import json

from api import errors
from api.errors import BodySizeLimitMiddleware


def run_refusal(chunks: int, chunk_bytes: int = 1024) -> tuple[list[str], int]:
    events: list[str] = []
    sent = {"n": 0}

    async def receive():
        sent["n"] += 1
        events.append("read")
        return {"type": "http.request", "body": b"\0" * chunk_bytes, "more_body": sent["n"] < chunks}

    async def send(message):
        if message["type"] == "http.response.start":
            events.append(f"status {message['status']}")
        elif message.get("body"):
            events.append(json.loads(message["body"])["error"]["param"])

    async def app(scope, receive, send):  # never reached: refused from Content-Length
        raise AssertionError("the app ran")

    middleware = BodySizeLimitMiddleware(app, lambda scope: 100)
    scope = {"type": "http", "path": "/v1/images/edits", "method": "POST",
             "headers": [(b"content-type", b"image/png"), (b"content-length", str(chunks * chunk_bytes).encode())]}
    asyncio.run(middleware(scope, receive, send))
    return events, sent["n"]


def test_the_body_is_drained_before_the_413_names_the_field():
    events, reads = run_refusal(chunks=10)
    assert reads == 10
    assert events == ["read"] * 10 + ["status 413", "image"]


def test_the_drain_is_bounded(monkeypatch):
    monkeypatch.setattr(errors, "LINGER_BYTES", 4 * 1024)
    events, reads = run_refusal(chunks=1000)
    assert reads == 4 and events[-2:] == ["status 413", "image"]
