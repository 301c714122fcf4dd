"""Fine-tuning through the HTTP API: a Ray job trains a LoRA, it is registered, and generation uses it at once."""

from __future__ import annotations

import json
import time
import uuid

import numpy as np
import pytest

from tests.serve.helpers import assert_error, decode_b64_png, noise_image

pytestmark = pytest.mark.serve


def _dataset(client, count: int) -> str:
    created = client.post("/v1/datasets", json={"name": f"corgis-{uuid.uuid4().hex[:8]}", "trigger_word": "zwx"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    files = [("files", (f"corgi{i}.png", noise_image(72, 64, seed=100 + i), "image/png")) for i in range(count)]
    uploaded = client.post(f"/v1/datasets/{dataset_id}/images", files=files)
    assert uploaded.status_code == 200 and uploaded.json()["added"] == count, uploaded.text
    return dataset_id


@pytest.fixture(scope="module")
def eight_images(atelier) -> str:
    import httpx

    with httpx.Client(base_url=atelier.base_url, timeout=120) as client:
        return _dataset(client, 8)


def _wait(client, job_id: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, f"fine-tuning job still {job['status']}: {job}"
        time.sleep(2)


def _generate(client, **fields) -> np.ndarray:
    response = client.post("/v1/images/generations", json={
        "prompt": "a dog on a beach", "size": "64x64", "steps": 2, "seed": 11, "response_format": "b64_json",
        **fields})
    assert response.status_code == 200, response.text
    return np.asarray(decode_b64_png(response.json()["data"][0]["b64_json"]), dtype=np.int16)


def test_fine_tuning_job_trains_registers_and_serves_the_lora(client, eight_images):
    name = f"corgi-{uuid.uuid4().hex[:6]}"
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdxl", "training_file": eight_images, "suffix": name,
        "hyperparameters": {"rank": 4, "max_steps": 6, "checkpoint_every_steps": 3}})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] in ("queued", "running") and job["total_steps"] == 6 and job["suffix"] == name

    final = _wait(client, job["id"])
    assert final["status"] == "succeeded", final
    assert final["fine_tuned_model"] == f"{name}:1" and final["step"] == 6 and final["progress"] == 100
    assert final["loss"] is not None and np.isfinite(final["loss"])
    assert final["id"] in [j["id"] for j in client.get("/v1/fine_tuning/jobs").json()["data"]]

    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    steps = sorted(e["data"]["step"] for e in events if e["type"] == "metrics")
    assert steps and steps[-1] == 6, events  # the run's per-step log lines, with loss
    assert any("registered" in e["message"] for e in events), events

    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    card = models[f"{name}:1"]
    assert card["kind"] == "lora" and card["metadata"]["trigger_word"] == "zwx"
    assert card["metadata"]["dataset_id"] == eight_images and card["metadata"]["rank"] == 4

    # Usable at once, with no restart: the image changes with the adapter, the trigger word joins the prompt.
    base = _generate(client)
    tuned = _generate(client, lora=name)
    assert np.abs(base - tuned).mean() > 0.5
    np.testing.assert_array_equal(tuned, _generate(client, lora=f"{name}:1"))  # deterministic under the seed
    body = client.post("/v1/images/generations", json={
        "prompt": "a dog", "size": "64x64", "steps": 2, "seed": 1, "lora": name, "response_format": "b64_json"}).json()
    assert body["data"][0]["revised_prompt"].startswith("zwx")

    # The same name again is refused unless a new version is asked for.
    again = client.post("/v1/fine_tuning/jobs", json={"model": "sdxl", "training_file": eight_images, "suffix": name})
    assert_error(again, 400, "suffix")


def test_cancel_stops_the_run_and_registers_nothing(client, eight_images):
    name = f"stopped-{uuid.uuid4().hex[:6]}"
    job = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdxl", "training_file": eight_images, "suffix": name,
        "hyperparameters": {"max_steps": 5000, "checkpoint_every_steps": 1000}}).json()
    deadline = time.monotonic() + 300
    while client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["step"] < 1:
        assert time.monotonic() < deadline, "training never started"
        time.sleep(1)
    # While it runs, its name is taken: a second job would train into the same run folder.
    twin = client.post("/v1/fine_tuning/jobs", json={"model": "sdxl", "training_file": eight_images, "suffix": name})
    assert job["id"] in assert_error(twin, 409, "suffix")["message"]
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    final = _wait(client, job["id"], timeout_s=60)
    assert final["status"] == "cancelled" and final["fine_tuned_model"] is None, final
    assert all(not m["id"].startswith(f"{name}:") for m in client.get("/v1/models").json()["data"])
    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "lora": name}), 404, "lora")


@pytest.mark.parametrize("override, param", [
    ({"model": "sdxl-turbo"}, "model"),
    ({"training_file": "ds_doesnotexist"}, "training_file"),
    ({"hyperparameters": {"rank": 0}}, "hyperparameters.rank"),
    ({"hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"learning_rate": -1e-4}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"resolution": 60}}, "hyperparameters.resolution"),
    ({"hyperparameters": {"batch_size": 8}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"num_workers": 100}}, "hyperparameters.num_workers"),  # more than the cluster holds
    ({"hyperparameters": {"rank": 100_000}}, "hyperparameters.rank"),
    ({"hyperparameters": {"min_images": 0}}, "hyperparameters.min_images"),
    ({"hyperparameters": {"warp_speed": 9}}, "hyperparameters.warp_speed"),
    ({"method": "distillation"}, "method"),
    ({"suffix": "bad name!"}, "suffix"),
])
def test_bad_fine_tuning_requests_name_the_field(client, eight_images, override, param):
    body = {"model": "sdxl", "training_file": eight_images, "suffix": f"x-{uuid.uuid4().hex[:6]}", **override}
    assert_error(client.post("/v1/fine_tuning/jobs", json=body), 400, param)


@pytest.mark.parametrize("field", ["learning_rate", "alpha", "max_grad_norm"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_hyperparameters_name_the_field(client, eight_images, field, value):
    # json.dumps writes JSON's Infinity / NaN, which Python's json (and so FastAPI) reads back
    body = json.dumps({"model": "sdxl", "training_file": eight_images, "suffix": f"x-{uuid.uuid4().hex[:6]}",
                       "hyperparameters": {field: value}})
    response = client.post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
    assert "finite" in assert_error(response, 400, f"hyperparameters.{field}")["message"]


def test_too_few_images_and_unknown_ids(client):
    small = _dataset(client, 2)
    # configs/local.yaml sets no min_images (a floor of 1): a request may ask for more, never fewer
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdxl", "training_file": small, "suffix": f"few-{uuid.uuid4().hex[:6]}",
        "hyperparameters": {"min_images": 5}})
    error = assert_error(response, 400, "training_file")
    assert "fewer than min_images 5" in error["message"]
    assert_error(client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404, "fine_tuning_job_id")
    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "lora": "never-trained"}), 404, "lora")
