"""Atelier's custom metrics reach Ray's Prometheus endpoint after some traffic."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.serve.helpers import wait_for_job

pytestmark = pytest.mark.serve


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_after_traffic(client, atelier):
    ray = atelier.connect_ray()
    try:
        ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    finally:
        ray.shutdown()

    assert client.post("/v1/images/generations", json={"prompt": "a gauge", "size": "64x64", "steps": 3,
                                                       "response_format": "b64_json"}).status_code == 200
    assert client.post("/v1/images/generations", json={"prompt": "x", "n": 3}).status_code == 400
    job = client.post("/v1/images/generations", params={"async": "true"},
                      json={"prompt": "a dial", "size": "64x64", "steps": 2}).json()
    assert wait_for_job(client, job["id"])["status"] == "completed"
    loras = [m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] == "lora"]
    if loras:
        for _ in range(2):
            assert client.post("/v1/images/generations", json={
                "prompt": "x", "size": "64x64", "steps": 2, "lora": loras[0]}).status_code == 200

    wanted = ["ray_atelier_generation_latency_s_count", "ray_atelier_denoising_steps_per_s",
              "ray_atelier_rejected_requests_total", "ray_atelier_job_duration_s_count", "ray_atelier_job_queue_depth"]
    if loras:
        wanted.append("ray_atelier_lora_cache_total")
    deadline = time.monotonic() + 90  # Ray exports every few seconds
    while True:
        text = "\n".join(scrape(port) for port in ports)
        missing = [name for name in wanted if not re.search(rf"^{name}[{{ ]", text, re.M)]
        if not missing:
            break
        assert time.monotonic() < deadline, f"metrics never exported: {missing}"
        time.sleep(3)

    assert value(text, "ray_atelier_generation_latency_s_count", model="sdxl", mode="text_to_image") >= 2
    assert value(text, "ray_atelier_denoising_steps_per_s", model="sdxl") > 0
    assert value(text, "ray_atelier_rejected_requests_total", reason="invalid_request_error") >= 1
    assert value(text, "ray_atelier_job_duration_s_count", kind="images.generations", outcome="completed") >= 1
    if loras:
        assert value(text, "ray_atelier_lora_cache_total", result="hit") >= 1
