"""Autoscaling you can watch: SDXL 1 -> 2 under load and back to 1 when idle; the job runner scales
on the Redis queue's length (Ray's async-inference policy). Replica counts over time are printed.

The same `serve deploy` carries two broken apps beside it (a missing model path, an unreachable
Redis): each must end DEPLOY_FAILED with its cause in `serve status`, not crash-loop without one,
and leave the good app alone. (They fail while the autoscaling runs, which saves a deploy cycle.)"""

from __future__ import annotations

import copy
import time
from collections import Counter

import pytest

from local.cluster import wait_for
from tests.cluster.helpers import Load, ReplicaTimeline, report

pytestmark = pytest.mark.serve


def _broken_app(atelier, name: str, prefix: str, **args_update) -> dict:
    app = copy.deepcopy(atelier.config()["applications"][0])
    app["name"], app["route_prefix"] = name, prefix
    # Its own queue and storage: a runner of this app (it deploys; only the broken part fails) must
    # not take the good app's jobs (it did: 4 of them hung waiting for an SDXL that never came up),
    # nor its reaper re-send them into this app's queue.
    app["args"]["queue"]["queue_name"] = f"{name}-jobs"
    app["args"]["storage_root"] = f"{app['args']['storage_root'].rstrip('/')}-{name}"
    for section, values in args_update.items():
        app["args"][section] = {**app["args"][section], **values}
    for deployment in app["deployments"]:  # one small replica each: these apps only have to fail
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return app


def _failed(cluster, app: str) -> dict | None:
    status = cluster.serve_status()["applications"].get(app) or {}
    return status if status.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") else None


def queue_length(cluster, key: str = "atelier-jobs") -> int:
    """Messages waiting in the job queue's Redis list (what Ray's async-inference policy reads), or
    with key="unacked", those a consumer took and has not acknowledged (Kombu's hash)."""
    import redis

    client = redis.Redis(port=cluster.redis.port, socket_timeout=2)
    try:
        return client.hlen(key) if key == "unacked" else client.llen(key)
    except redis.RedisError:
        return -1
    finally:
        client.close()


def total(cluster, deployment: str) -> int:
    return sum(cluster.replicas_by_node(deployment).values())


def test_sdxl_and_job_runner_scale_up_and_down_and_broken_apps_name_their_cause(atelier):
    cluster = atelier.cluster
    t0 = time.monotonic()
    timeline = ReplicaTimeline(cluster, ("SDXLDeployment", "JobRunnerDeployment"), t0)
    timeline.start()
    marks: dict[str, float] = {}
    try:
        # Short delays, and SDXL allowed down to one replica; the two broken apps beside it.
        missing = _broken_app(atelier, "missing-model", "/broken-model", sdxl={"model": "models/tiny/no-such-model"})
        no_redis = _broken_app(atelier, "no-redis", "/broken-redis",
                               queue={"broker_url": "redis://127.0.0.1:9/0", "backend_url": "redis://127.0.0.1:9/1"})
        atelier.deploy(atelier.config({"SDXLDeployment": {"autoscaling_config": {
            "min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 8}}},
            extra_apps=[missing, no_redis]), "autoscale.yaml")
        wait_for(lambda: total(cluster, "SDXLDeployment") == 1, 180, 1, "SDXL down to 1 replica (idle)")
        marks["sdxl idle at 1"] = time.monotonic() - t0

        # 1. SDXL: 8 clients in a loop -> 2 replicas.
        with Load(atelier.base_url, steps=8):
            wait_for(lambda: total(cluster, "SDXLDeployment") == 2, 180, 1, "SDXL up to 2 replicas under load")
            marks["sdxl up to 2"] = time.monotonic() - t0
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
            lengths: list[tuple[float, int]] = []
            def up():
                lengths.append((round(time.monotonic() - t0, 1), queue_length(cluster), queue_length(cluster, "unacked")))
                return total(cluster, "JobRunnerDeployment") == 2
            try:
                wait_for(up, 180, 1, "job runner up to 2 on queue length")
            finally:
                report(f"[autoscaling] the Redis queue while the backlog waited (s, waiting, unacked): {lengths[::5]}")
            marks["job runner up to 2"] = time.monotonic() - t0
            try:
                wait_for(lambda: all(client.get(f"/v1/jobs/{j}").json()["status"] in ("completed", "failed")
                                     for j in jobs), 300, 2, "the backlog done")
            finally:
                left = [client.get(f"/v1/jobs/{j}").json() for j in jobs]
                report(f"[autoscaling] the backlog: {Counter((v['status'], v['attempts']) for v in left)}; "
                       f"queue {queue_length(cluster)}, unacked {queue_length(cluster, 'unacked')}")
            views = [client.get(f"/v1/jobs/{j}").json() for j in jobs]
            statuses = [v["status"] for v in views]
            # no job was cut by a runner stopping under it (a cut job is re-run: a second attempt)
            attempts = [v["attempts"] for v in views]
        wait_for(lambda: total(cluster, "JobRunnerDeployment") == 1, 180, 1, "job runner back to 1 when the queue is empty")
        marks["job runner back to 1"] = time.monotonic() - t0

        # The broken apps, by now long failed (or soon): each names its cause; the good app runs.
        model = wait_for(lambda: _failed(cluster, "missing-model"), 300, 2, "missing-model DEPLOY_FAILED")
        redis = wait_for(lambda: _failed(cluster, "no-redis"), 300, 2, "no-redis DEPLOY_FAILED")
        report(f"[faults] missing model: {model['status']}: {str(model)[-600:]}")
        report(f"[faults] unreachable redis: {redis['status']}: {str(redis)[-600:]}")
        assert "no-such-model" in str(model), model
        assert "Redis broker at 127.0.0.1:9 is unreachable" in str(redis), redis
        assert cluster.serve_status()["applications"]["atelier"]["status"] == "RUNNING"
    finally:
        timeline.stop.set()
        timeline.join()
        report("\n[autoscaling] " + ", ".join(f"{k} at {v:.1f}s" for k, v in marks.items()))
        report("[autoscaling] replicas over time (s):")
        for t, sample in timeline.samples:
            report(f"    {t:7.1f}  {sample}")
        # back to the base config (2 SDXL replicas, one per node; no broken apps) for the tests after this one
        atelier.deploy()
        atelier.wait_running()
        wait_for(lambda: set(cluster.serve_status()["applications"]) == {"atelier"}, 120, 2, "broken apps removed")
    assert statuses.count("completed") == len(jobs), statuses
    assert attempts == [1] * len(jobs), attempts
    counts = [sum(s.get("SDXLDeployment", {}).values()) for _, s in timeline.samples if "error" not in s]
    assert 2 in counts and counts.index(2) < len(counts) - 1 - counts[::-1].index(1)  # up, then down
