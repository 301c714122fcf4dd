"""A job survives the death of the model replica running it."""

from __future__ import annotations

import time

import pytest

from tests.serve.helpers import replica_actors, wait_for_job

pytestmark = pytest.mark.serve


@pytest.fixture()
def ray_cluster(atelier):
    ray = atelier.connect_ray()
    yield ray
    ray.shutdown()


def test_job_completes_on_retry_when_its_sdxl_replica_is_killed(client, ray_cluster):
    job = client.post("/v1/images/generations", params={"async": "true"},
                      json={"prompt": "survivor", "size": "64x64", "steps": 40, "n": 4, "seed": 3}).json()
    deadline = time.monotonic() + 60
    while (client.get(f"/v1/jobs/{job['id']}").json()["step"] or 0) < 2:
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.1)

    replicas = replica_actors(ray_cluster, "SDXLDeployment")
    assert replicas
    for replica in replicas:
        ray_cluster.kill(replica, no_restart=True)

    final = wait_for_job(client, job["id"], timeout_s=300)
    assert final["status"] == "completed", final
    assert final["attempts"] == 2
    assert len(final["outputs"]) == 4
