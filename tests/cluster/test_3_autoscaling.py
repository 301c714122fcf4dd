"""Autoscaling you can watch: SDXL 1 -> 2 under load and back to 1 when idle; the job runner scales
on the Redis queue's length (Ray's async-inference policy). Replica counts over time are printed."""

from __future__ import annotations

import threading
import time

import pytest

from local.cluster import wait_for
from tests.cluster.helpers import ReplicaTimeline, generate

pytestmark = pytest.mark.serve


def total(cluster, deployment: str) -> int:
    return sum(cluster.replicas_by_node(deployment).values())


def test_sdxl_and_job_runner_scale_up_under_load_and_down_when_idle(atelier):
    cluster = atelier.cluster
    t0 = time.monotonic()
    timeline = ReplicaTimeline(cluster, ("SDXLDeployment", "JobRunnerDeployment"), t0)
    timeline.start()
    marks: dict[str, float] = {}
    try:
        # Short delays, and SDXL allowed down to one replica.
        atelier.deploy(atelier.config({"SDXLDeployment": {"autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 8}}}), "autoscale.yaml")
        wait_for(lambda: total(cluster, "SDXLDeployment") == 1, 180, 1, "SDXL down to 1 replica (idle)")
        marks["sdxl idle at 1"] = time.monotonic() - t0

        # 1. SDXL: 8 clients in a loop -> 2 replicas.
        stop = threading.Event()
        def load():
            while not stop.is_set():
                generate(atelier.base_url, 3, steps=8)
        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: total(cluster, "SDXLDeployment") == 2, 180, 1, "SDXL up to 2 replicas under load")
            marks["sdxl up to 2"] = time.monotonic() - t0
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=130)
        wait_for(lambda: total(cluster, "SDXLDeployment") == 1, 180, 1, "SDXL back to 1 replica after idle")
        marks["sdxl back to 1"] = time.monotonic() - t0

        # 2. Job runner: a backlog in the Redis queue (4 running per replica, the rest queued) -> 2.
        with atelier.client() as client:
            jobs = []
            for i in range(32):
                r = client.post("/v1/images/generations", params={"async": "true"},
                                json={"prompt": f"a barn {i}", "size": "64x64", "steps": 8, "seed": i})
                assert r.status_code == 202, r.text
                jobs.append(r.json()["id"])
            wait_for(lambda: total(cluster, "JobRunnerDeployment") == 2, 180, 1, "job runner up to 2 on queue length")
            marks["job runner up to 2"] = time.monotonic() - t0
            wait_for(lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] in ("completed", "failed") for j in jobs),
                     300, 2, "the backlog done")
            statuses = [client.get(f"/v1/jobs/{j}").json()["status"] for j in jobs]
        wait_for(lambda: total(cluster, "JobRunnerDeployment") == 1, 180, 1, "job runner back to 1 when the queue is empty")
        marks["job runner back to 1"] = time.monotonic() - t0
    finally:
        timeline.stop.set()
        timeline.join()
        print("\n[autoscaling] " + ", ".join(f"{k} at {v:.1f}s" for k, v in marks.items()))
        print("[autoscaling] replicas over time (s):")
        for t, sample in timeline.samples:
            print(f"    {t:7.1f}  {sample}")
        # back to the base config (2 SDXL replicas, one per node) for the tests after this one
        atelier.deploy()
        atelier.wait_running()
    assert statuses.count("completed") == len(jobs), statuses
    counts = [sum(s.get("SDXLDeployment", {}).values()) for _, s in timeline.samples if "error" not in s]
    assert 2 in counts and counts.index(2) < len(counts) - 1 - counts[::-1].index(1)  # up, then down
