"""Fine-tuning across the two nodes: 2 Ray Train workers, one per node, the dataset and the
checkpoints on S3. The worker node is lost mid-run; the run goes on (Ray Train's elastic
ScalingConfig(num_workers=(1, 2)) with FailureConfig(max_failures)) and resumes from its last
checkpoint, at a step > 0. The same training through `ray job submit`, with the cluster's token."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest

from local.cluster import wait_for
from tests.serve.helpers import noise_image

pytestmark = pytest.mark.serve


def _dataset(client, count: int = 8) -> str:
    created = client.post("/v1/datasets", json={"name": f"gulls-{uuid.uuid4().hex[:8]}", "trigger_word": "zwx"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    files = [("files", (f"gull{i}.png", noise_image(72, 64, seed=200 + i), "image/png")) for i in range(count)]
    uploaded = client.post(f"/v1/datasets/{dataset_id}/images", files=files)
    assert uploaded.status_code == 200 and uploaded.json()["added"] == count, uploaded.text
    return dataset_id


def _train_workers_by_node(cluster) -> dict[str, int]:
    import httpx

    resp = httpx.get(f"{cluster.dashboard_url}/api/v0/actors", headers=cluster.auth_headers(), timeout=20,
                     params={"limit": 10000, "detail": "true"})
    actors = resp.json()["data"]["result"]["result"]
    labels = cluster.node_labels()
    counts: dict[str, int] = {}
    for actor in actors:
        if actor["state"] == "ALIVE" and "RayTrainWorker" in (actor.get("class_name") or ""):
            label = labels.get(actor.get("node_id"), "gone")
            counts[label] = counts.get(label, 0) + 1
    return counts


@pytest.fixture(scope="module")
def dataset_id(atelier) -> str:
    with atelier.client() as client:
        return _dataset(client)


def test_fine_tuning_on_two_nodes_resumes_after_node_loss(atelier, dataset_id):
    cluster = atelier.cluster
    if not cluster.worker.alive():  # an earlier test that failed may have left one node
        cluster.restart_worker()
    client = atelier.client()
    name = f"gull-{uuid.uuid4().hex[:6]}"
    t0 = time.monotonic()
    response = client.post("/v1/fine_tuning/jobs", json={
        "model": "sdxl", "training_file": dataset_id, "suffix": name,
        "hyperparameters": {"max_steps": 30, "checkpoint_every_steps": 2}})
    assert response.status_code == 200, response.text
    job_id = response.json()["id"]

    # 1. Two workers, one on each node, and a checkpoint in S3 past step 0.
    spread = wait_for(lambda: (lambda c: c if c == {"node_a": 1, "node_b": 1} else None)(_train_workers_by_node(cluster)),
                      300, 1, "one Ray Train worker per node")
    job = wait_for(lambda: (lambda j: j if (j.get("step") or 0) >= 3 else None)(client.get(f"/v1/fine_tuning/jobs/{job_id}").json()),
                   300, 0.5, "training past the first checkpoint")
    step_at_kill = job["step"]

    # 2. Lose the worker node mid-run.
    t_kill = time.monotonic()
    cluster.worker.kill()

    # 3. The run goes on with the head's worker, from its last checkpoint, and finishes.
    final = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed", "cancelled") else None)(
        client.get(f"/v1/fine_tuning/jobs/{job_id}").json()), 600, 2, "the fine-tuning job finished")
    t_done = time.monotonic() - t_kill
    events = client.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]
    resumed = [int(m) for e in events for m in re.findall(r"resumed from checkpoint at step (\d+)", e.get("message", ""))]
    if final.get("resumed_from_step") is not None:  # the run's own status.json, as the API shows it
        resumed.append(final["resumed_from_step"])
    print(f"\n[training] workers per node {spread}; killed the worker node at step {step_at_kill}; "
          f"resumed from steps {resumed}; {final['status']} {t_done:.1f}s after the kill "
          f"({time.monotonic() - t0:.1f}s in all)")
    assert final["status"] == "succeeded", final
    assert final["step"] == 30 and final["fine_tuned_model"] == f"{name}:1"
    assert resumed and max(resumed) > 0, events

    cluster.restart_worker()


def test_ray_job_submit_with_the_token(atelier, dataset_id):
    cluster = atelier.cluster
    name = f"gull-cli-{uuid.uuid4().hex[:6]}"
    config = {"name": name, "base_model": "models/tiny/sdxl", "dataset_id": dataset_id,
              "storage_root": atelier.config()["applications"][0]["args"]["storage_root"],
              "resolution": 64, "num_workers": 2, "placement_strategy": "SPREAD", "cpus_per_worker": 0.5,
              "data_cpus": 0.2, "max_steps": 4, "checkpoint_every_steps": 2, "learning_rate": 0.001}
    runtime_env = json.dumps({"working_dir": atelier.bundle_uri})
    command = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--runtime-env-json", runtime_env,
               "--", "python", "-m", "training.cli", "--config-json", json.dumps(config)]

    # Without the token, Ray refuses (this is what the README's command met on a 2.60 cluster).
    refused = cluster.cli(*command, check=False, timeout_s=120,
                          env={"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": ""})
    assert refused.returncode != 0
    assert "auth" in (refused.stdout + refused.stderr).lower(), refused.stderr[-2000:]

    # With RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN here; ops may use
    # RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), it runs to the end and registers the adapter.
    started = time.monotonic()
    done = cluster.cli(*command, timeout_s=600)
    output = done.stdout
    print(f"\n[training] ray job submit: {time.monotonic() - started:.1f}s; {output.strip().splitlines()[-1][:300]}")
    assert f'"lora": "{name}:1"' in output, output[-3000:]
    assert "succeeded" in output.lower(), output[-3000:]
