"""Durable jobs: 202 → progress → completed, SSE events, cancel, listing."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.helpers import assert_error, noise_image, read_events, wait_for_job

pytestmark = pytest.mark.serve


def submit(client, **fields) -> dict:
    body = {"prompt": "a windmill", "size": "64x64", "steps": 4, "seed": 11, **fields}
    response = client.post("/v1/images/generations", params={"async": "true"}, json=body)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def test_job_runs_from_202_to_completed_with_progress_to_100(client):
    job = submit(client, n=2, steps=16)  # long enough (about 1 s here) for the 0.25 s SSE poll to see a step
    assert job["status"] in ("queued", "in_progress") and job["object"] == "job"
    events = read_events(client, job["id"])
    progress = [event["progress"] for event in events]
    assert progress == sorted(progress), progress  # never goes backwards
    assert any(0 < p < 100 for p in progress), progress  # intermediate steps were reported
    final = events[-1]
    assert final["status"] == "completed" and final["progress"] == 100
    assert final["stage"] == "generate" and final["step"] == final["total_steps"] == 16
    assert [o["seed"] for o in final["outputs"]] == [11, 12]
    for output in final["outputs"]:
        png = httpx.get(output["url"], timeout=30)
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
        assert (output["width"], output["height"]) == (64, 64)


def test_job_output_equals_the_sync_output_for_the_same_seed(client):
    job = wait_for_job(client, submit(client, seed=77)["id"])
    sync = client.post("/v1/images/generations", json={
        "prompt": "a windmill", "size": "64x64", "steps": 4, "seed": 77}).json()
    job_png = httpx.get(job["outputs"][0]["url"]).content
    sync_png = httpx.get(sync["data"][0]["url"]).content
    assert job_png == sync_png


def test_prefer_respond_async_header(client):
    response = client.post("/v1/images/generations", headers={"Prefer": "respond-async"},
                           json={"prompt": "x", "size": "64x64", "steps": 1})
    assert response.status_code == 202
    assert wait_for_job(client, response.json()["id"])["status"] == "completed"


def test_edit_as_a_job(client):
    response = client.post("/v1/images/edits", params={"async": "true"},
                           files={"image": ("in.png", noise_image(64, 64), "image/png")},
                           data={"prompt": "sepia", "steps": "4", "strength": "0.5"})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"])
    assert job["status"] == "completed" and job["kind"] == "images.edits"
    assert len(job["outputs"]) == 1


def test_cancel_a_running_job_stops_it(client):
    job = submit(client, steps=50, n=4)
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job['id']}").json()["step"] in (None, 0):
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.1)
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    final = wait_for_job(client, job["id"])
    assert final["status"] == "cancelled"
    assert final["step"] < 50 and final["outputs"] == []
    # cancelling a finished job is a no-op that reports the final state
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"


def test_cancel_a_queued_job(client):
    # Fill the runner's threads with long jobs so the last one waits in the queue.
    jobs = [submit(client, steps=40, n=8) for _ in range(5)]
    last = jobs[-1]
    cancelled = client.post(f"/v1/jobs/{last['id']}/cancel").json()
    for job in jobs[:-1]:
        client.post(f"/v1/jobs/{job['id']}/cancel")
    final = wait_for_job(client, last["id"])
    assert final["status"] == "cancelled" and final["outputs"] == []
    assert cancelled["status"] in ("cancelled", "in_progress")


def test_list_jobs_newest_first_with_filters(client):
    a, b = submit(client, steps=1), submit(client, steps=1)
    wait_for_job(client, a["id"]), wait_for_job(client, b["id"])
    listed = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [job["id"] for job in listed["data"]] == [b["id"], a["id"]]
    assert listed["has_more"] is True
    older = client.get("/v1/jobs", params={"limit": 1, "after": b["id"]}).json()
    assert older["data"][0]["id"] == a["id"]
    completed = client.get("/v1/jobs", params={"status": "completed", "limit": 100}).json()["data"]
    assert all(job["status"] == "completed" for job in completed)
    assert_error(client.get("/v1/jobs", params={"status": "bogus"}), 400, "status")
    assert_error(client.get("/v1/jobs", params={"limit": 0}), 400, "limit")
