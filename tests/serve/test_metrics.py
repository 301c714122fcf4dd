"""Atelier's custom metrics reach Ray's Prometheus endpoint after some traffic."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve.helpers import wait_for_job

pytestmark = pytest.mark.serve


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def series(text: str, name: str) -> list[float]:
    """The value of each of a metric's series (a gauge reported by several processes has several)."""
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")]


def unfinished_jobs(client: httpx.Client) -> int:
    return sum(len(client.get("/v1/jobs", params={"status": status, "limit": 100}).json()["data"])
               for status in ("queued", "in_progress"))


def value(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def registered_lora(atelier, client, tmp_path) -> str:
    """A LoRA for the test to generate with: a random adapter on the tiny SDXL, registered in the
    app's storage as a training run would register it (no training needed)."""
    if getattr(atelier, "config_path", None) is None:  # an attached app: its storage is not known here
        loras = [m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] == "lora"]
        if not loras:
            pytest.skip("an attached app with no registered LoRA")
        return loras[0]
    from local.tiny_models import build_random_lora
    from storage import Storage
    from storage.registry import LoraRegistry

    args = yaml.safe_load(atelier.config_path.read_text())["applications"][0]["args"]
    base = str((Path(args["base_dir"]) / args["sdxl"]["model"]).resolve())
    name = f"metrics-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    record = LoraRegistry(Storage(args["storage_root"])).register(
        name, {"base_model": base, "rank": 4}, build_random_lora(base, tmp_path / name, seed=3))
    return record.id


def test_metrics_after_traffic(client, atelier, tmp_path):
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
    lora = registered_lora(atelier, client, tmp_path)
    for _ in range(2):  # the first loads the adapter (a miss, unless cached already), the second hits
        response = client.post("/v1/images/generations", json={
            "prompt": "x", "size": "64x64", "steps": 2, "lora": lora, "response_format": "b64_json"})
        assert response.status_code == 200, response.text

    wanted = ["ray_atelier_generation_latency_s_count", "ray_atelier_denoising_steps_per_s",
              "ray_atelier_rejected_requests_total", "ray_atelier_job_duration_s_count", "ray_atelier_job_queue_depth",
              "ray_atelier_lora_cache_total"]
    deadline = time.monotonic() + 90  # Ray exports every few seconds; runners report the depth every few
    while True:
        text = "\n".join(scrape(port) for port in ports)
        missing = [name for name in wanted if not re.search(rf"^{name}[{{ ]", text, re.M)]
        # The depth gauge is lowered when jobs finish: the job runner's series comes to the number of
        # unfinished jobs (a runner replica killed by an earlier test may have left a stale series).
        depths = series(text, "ray_atelier_job_queue_depth")
        if not missing and unfinished_jobs(client) in depths:
            break
        assert time.monotonic() < deadline, f"metrics never exported: {missing}; queue depth series {depths} " \
                                             f"while {unfinished_jobs(client)} jobs are unfinished"
        time.sleep(3)

    assert value(text, "ray_atelier_generation_latency_s_count", model="sdxl", mode="text_to_image") >= 2
    assert value(text, "ray_atelier_denoising_steps_per_s", model="sdxl") > 0
    assert value(text, "ray_atelier_rejected_requests_total", reason="invalid_request_error") >= 1
    assert value(text, "ray_atelier_job_duration_s_count", kind="images.generations", outcome="completed") >= 1
    assert value(text, "ray_atelier_lora_cache_total", result="hit") >= 1
    assert value(text, "ray_atelier_lora_cache_total") >= 2  # a hit or a miss on every LoRA request
