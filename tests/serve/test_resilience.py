"""Overload, replica deaths, a hung replica and hang-ups, against the real app (issue 8)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve.helpers import decode_b64_png, noise_image, replica_actors, wait_for_job

pytestmark = pytest.mark.serve

LOCAL_CONFIG = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "local.yaml").read_text())
TERMINAL = {"completed", "failed", "cancelled"}


def deployment_config(name: str) -> dict:
    return next(d for d in LOCAL_CONFIG["applications"][0]["deployments"] if d["name"] == name)


@pytest.fixture()
def ray_cluster(atelier):
    ray = atelier.connect_ray()
    yield ray
    ray.shutdown()


def ongoing(ray, deployment: str) -> int:
    replicas = replica_actors(ray, deployment)
    return sum(ray.get([a.get_num_ongoing_requests.remote() for a in replicas], timeout=30))


def wait_until_serving(client: httpx.Client, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the app did not become ready again"
        time.sleep(1)


# --- backpressure --------------------------------------------------------------------------------


@pytest.mark.timeout(900)
def test_four_times_capacity_is_refused_with_retry_after_and_nothing_accepted_is_lost(atelier, client, ray_cluster):
    sdxl = deployment_config("SDXLDeployment")
    replicas = len(replica_actors(ray_cluster, "SDXLDeployment"))
    capacity = replicas * (sdxl["max_ongoing_requests"] + sdxl["max_queued_requests"])
    total = 4 * capacity
    body = {"prompt": "a crowd", "size": "64x64", "steps": 2, "n": 1, "response_format": "b64_json"}

    async def burst() -> list[httpx.Response | Exception]:
        limits = httpx.Limits(max_connections=total, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=atelier.base_url, timeout=300, limits=limits) as http:
            async def one(i: int):
                try:
                    return await http.post("/v1/images/generations", json={**body, "seed": i})
                except httpx.HTTPError as exc:
                    return exc
            return await asyncio.gather(*(one(i) for i in range(total)))

    started = time.monotonic()
    responses = asyncio.run(burst())
    elapsed = time.monotonic() - started

    errors = [r for r in responses if isinstance(r, Exception)]
    assert not errors, f"{len(errors)} requests failed at the transport level: {errors[:3]}"
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    accepted = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code != 200]
    assert rejected, f"{total} concurrent requests to a capacity of {capacity} were all admitted"
    assert len(accepted) >= capacity // 2, (len(accepted), capacity)
    for response in accepted:  # every accepted request completed with its image
        data = response.json()["data"]
        assert len(data) == 1 and decode_b64_png(data[0]["b64_json"]).size == (64, 64)
    by_proxy = 0
    for response in rejected:
        assert int(response.headers["retry-after"]) >= 1, (response.headers, response.text)
        if response.headers.get("content-type", "").startswith("application/json"):
            # refused by the model deployment, through the ingress's error shape
            assert response.json()["error"]["type"] == "overloaded_error", response.text
        else:
            # past the ingress's own max_queued_requests: Serve's proxy refuses in plain text, with the
            # Retry-After of the ingress's backpressure_config
            assert response.status_code == 503 and "backpressure" in response.text, response.text
            by_proxy += 1
    print(f"burst of {total} (capacity {capacity}): {len(accepted)} accepted, {len(rejected)} refused "
          f"({by_proxy} by the proxy), {elapsed:.1f} s")

    # right after: normal service
    after = client.post("/v1/images/generations", json={**body, "seed": 1})
    assert after.status_code == 200, after.text
    assert decode_b64_png(after.json()["data"][0]["b64_json"]).size == (64, 64)


# --- faults --------------------------------------------------------------------------------------


def test_twenty_jobs_through_replica_kills_none_lost_or_stuck(client, ray_cluster):
    jobs = []
    for seed in range(20):
        response = client.post("/v1/images/generations", params={"async": "true"},
                               json={"prompt": "endurance", "size": "64x64", "steps": 20, "seed": seed})
        assert response.status_code == 202, response.text
        jobs.append(response.json()["id"])

    # Kill every SDXL replica whenever one is running a job, a few times over the batch.
    kills, deadline = 0, time.monotonic() + 240
    while kills < 3 and time.monotonic() < deadline:
        states = [client.get(f"/v1/jobs/{job_id}").json() for job_id in jobs]
        if all(s["status"] in TERMINAL for s in states):
            break
        if any(s["status"] == "in_progress" and (s["step"] or 0) >= 1 for s in states):
            killed = {replica._actor_id.hex() for replica in replica_actors(ray_cluster, "SDXLDeployment")}
            for replica in replica_actors(ray_cluster, "SDXLDeployment"):
                ray_cluster.kill(replica, no_restart=True)
            kills += 1
            # the next kill waits for Serve's replacement (not a fixed pause), so each one hits live work
            while not (ids := {r._actor_id.hex() for r in replica_actors(ray_cluster, "SDXLDeployment")}) \
                    or ids & killed:
                assert time.monotonic() < deadline + 120, f"no replacement SDXL replica: {ids}"
                time.sleep(0.2)
        time.sleep(0.2)
    assert kills >= 2, "no job was ever seen running"

    finals = [wait_for_job(client, job_id, timeout_s=400) for job_id in jobs]
    by_status = {s: [f for f in finals if f["status"] == s] for s in ("completed", "failed")}
    assert len(by_status["completed"]) + len(by_status["failed"]) == 20, [f["status"] for f in finals]
    for job in by_status["completed"]:
        assert len(job["outputs"]) == 1 and job["progress"] == 100.0
        png = client.get(f"/v1/files/{job['outputs'][0]['key']}")
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    for job in by_status["failed"]:  # out of attempts: says why
        assert job["error"]["type"] and job["error"]["message"] and job["attempts"] >= 2, job
    retried = sum(1 for f in finals if f["attempts"] > 1)
    print(f"{kills} kills: {len(by_status['completed'])} completed ({retried} after a retry), "
          f"{len(by_status['failed'])} failed cleanly")
    assert retried >= 1
    wait_until_serving(client)


def test_a_replica_with_a_blocked_event_loop_fails_health_checks_and_is_replaced(client, ray_cluster):
    (hung,) = replica_actors(ray_cluster, "UpscalerDeployment")
    hung_id = hung._actor_id.hex()

    def block(replica, seconds):  # runs on the replica's event loop
        time.sleep(seconds)

    hung.__ray_call__.remote(block, 120)
    deadline = time.monotonic() + 150
    while True:
        ids = [a._actor_id.hex() for a in replica_actors(ray_cluster, "UpscalerDeployment")]
        if hung_id not in ids and ids:
            break
        assert time.monotonic() < deadline, f"the hung replica was not replaced: {ids}"
        time.sleep(1)
    replaced_after = 150 - (deadline - time.monotonic())
    print(f"hung upscaler replica replaced after {replaced_after:.0f} s")
    assert replaced_after < 110  # before the block would have ended by itself

    wait_until_serving(client)
    response = client.post("/v1/images/upscale", files={"image": ("in.png", noise_image(32, 32), "image/png")},
                           data={"steps": "2", "seed": "1", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (128, 128)


def _hang_up_after(host: str, port: int, raw_request: bytes, read_bytes: int, counted: threading.Event,
                   heard: list[str]) -> None:
    """Send a request, read a little of the answer (or nothing), and close the socket; what was
    read (its status line, or how the read ended) goes to `heard`."""
    with socket.create_connection((host, port), timeout=60) as sock:
        sock.sendall(raw_request)
        if read_bytes:
            try:
                heard.append(sock.recv(read_bytes).split(b"\r\n", 1)[0].decode(errors="replace"))
            except OSError as error:
                heard.append(type(error).__name__)
        counted.wait(30)  # hold the request open until the counters have seen it


def _raw(method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def test_fifty_clients_hanging_up_mid_request_leave_no_ongoing_requests(atelier, client, ray_cluster):
    import json as _json

    host, port = atelier.base_url.removeprefix("http://").split(":")
    # a long job to follow: cancelled at the end
    long_job = client.post("/v1/images/generations", params={"async": "true"},
                           json={"prompt": "slow", "size": "128x128", "n": 4, "steps": 50, "seed": 1})
    assert long_job.status_code == 202, long_job.text
    long_job = long_job.json()
    llm = next(m["id"] for m in client.get("/v1/models").json()["data"] if m["kind"] == "text")
    requests = (
        # sync image requests: hang up before any answer
        [_raw("POST", "/v1/images/generations", _json.dumps(
            {"prompt": f"gone {i}", "size": "64x64", "steps": 40, "seed": i, "response_format": "b64_json"}).encode())
         for i in range(20)]
        # SSE job streams: read the first event, then hang up
        + [_raw("GET", f"/v1/jobs/{long_job['id']}/events") for _ in range(15)]
        # streamed completions: read the first chunk, then hang up
        + [_raw("POST", "/v1/completions", _json.dumps(
            {"model": llm, "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}).encode())
           for _ in range(15)]
    )
    counted = threading.Event()
    heard: list[list[str]] = [[] for _ in requests]
    threads = [threading.Thread(target=_hang_up_after,
                                args=(host, int(port), raw, 0 if i < 20 else 256, counted, heard[i]))
               for i, raw in enumerate(requests)]
    for thread in threads:
        thread.start()
    # Peaks, not one sample: the tiny Gemma may finish a stream before the last image request arrives.
    live = {name: 0 for name in ("IngressDeployment", "SDXLDeployment", "GemmaDeployment")}
    deadline = time.monotonic() + 60
    while not (live["IngressDeployment"] >= 45 and live["SDXLDeployment"] >= 1 and live["GemmaDeployment"] >= 1):
        if time.monotonic() > deadline:
            break
        live = {name: max(peak, ongoing(ray_cluster, name)) for name, peak in live.items()}
        time.sleep(0.1)
    counted.set()  # every client hangs up now
    for thread in threads:
        thread.join(60)
    client.post(f"/v1/jobs/{long_job['id']}/cancel")
    # the job's own SDXL call is real work until the cancel lands at its next step
    assert wait_for_job(client, long_job["id"], timeout_s=300)["status"] in TERMINAL

    deadline = time.monotonic() + 90
    while (now := {name: ongoing(ray_cluster, name) for name in live}) != {name: 0 for name in live}:
        assert time.monotonic() < deadline, f"ongoing requests stuck at {now} (while connected: {live})"
        time.sleep(0.5)
    print(f"peaks while connected: {live}; all back to 0")
    # the counters did see the requests, so their return to 0 means something
    assert live["IngressDeployment"] >= 25 and live["SDXLDeployment"] >= 1 and live["GemmaDeployment"] >= 1, \
        (live, "SSE streams heard", heard[20:35], "completions heard", heard[35:])
    assert client.get("/healthz").status_code == 200
