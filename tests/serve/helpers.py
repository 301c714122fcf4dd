"""Decoding and polling helpers for the serve tests."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
from PIL import Image

from tests.media import noise_image, png_bytes  # noqa: F401  (re-exported for the serve tests)


def decode_b64_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def wait_for_job(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished after {timeout_s}s: {job}")


def read_events(client: httpx.Client, job_id: str, timeout_s: float = 120) -> list[dict]:
    """All `job` events of a job's SSE stream until it ends."""
    events, name = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout_s) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name == "job":
                events.append(json.loads(line.split(":", 1)[1]))
            elif line.startswith("data:") and name == "done":
                break
    return events


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) - {"code"} == {"type", "message", "param"}  # OpenAI's `code` where one applies
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def replica_actors(ray, deployment: str, app: str = "atelier") -> list:
    """Handles of a deployment's live replica actors (core API: no dashboard/state API needed)."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return [ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]


def browse_dataset(page, dataset_id: str, images: int) -> None:
    """On the datasets page, open one dataset's image browser and wait for its first `images` images.
    The click is retried: on a loaded machine the list can be re-rendered (the page's own refresh)
    between Playwright finding the button and the click landing, and the click is then lost."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(3):
        page.click(f"button[data-browse='{dataset_id}']")
        try:
            page.wait_for_function("id => document.querySelector('#ds-browser-title')?.textContent.includes(id)",
                                   arg=dataset_id, timeout=20_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    page.wait_for_selector(f"#ds-images li:nth-child({images})")
