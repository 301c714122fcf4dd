"""A 10 s outage of the Celery broker (Redis, killed, and back empty: no persistence) loses no
accepted job. Jobs queued before it had their messages only in Redis; the job runners' reaper sees
the broker's sentinel key gone and sends them again. A submission during the outage is refused with
503 + Retry-After (never accepted and then dropped); sync requests, which need no broker, go on.

The job runner gets no Serve requests: Ray's async-inference policy scales it on the Redis queue's
length. The backlog here takes it from 1 replica to 2 and, once the queue is empty, back to 1; the
counts Serve wanted over time are printed.
"""

from __future__ import annotations

import time

import pytest

from local.cluster import wait_for
from tests.cluster.helpers import TargetTimeline, generate, report, wait_finished

pytestmark = pytest.mark.serve

OUTAGE_S = 10.0


def _submit(client, i: int):
    return client.post("/v1/images/generations", params={"async": "true"},
                       json={"prompt": f"a quay {i}", "size": "64x64", "steps": 8, "seed": i})


def test_a_broker_outage_loses_no_accepted_job(atelier):
    redis = atelier.cluster.redis
    client = atelier.client()
    t0 = time.monotonic()
    runners = TargetTimeline(atelier, "JobRunnerDeployment", t0)
    runners.start()
    accepted = []
    for i in range(12):  # 4 run per runner replica; the rest wait in Redis
        r = _submit(client, i)
        assert r.status_code == 202, r.text
        accepted.append(r.json()["id"])
    wait_for(lambda: any(client.get(f"/v1/jobs/{j}").json()["status"] == "in_progress" for j in accepted),
             120, 0.3, "a job running")
    queued_at_kill = sum(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in accepted)

    t_down = time.monotonic()
    redis.stop()  # SIGKILL; it comes back with nothing
    during, sync = [], []
    i = 100
    while time.monotonic() - t_down < OUTAGE_S:
        started = time.monotonic()
        r = _submit(client, i)
        during.append((r.status_code, round(time.monotonic() - started, 2)))
        if r.status_code == 202:
            accepted.append(r.json()["id"])
        else:
            assert r.status_code == 503 and r.headers.get("retry-after"), (r.status_code, r.text)
            assert r.json()["error"]["message"], r.text
        if len(sync) < 2:
            sync.append(generate(atelier.base_url, i, steps=2)[0])
        i += 1
        time.sleep(0.5)
    redis.start()  # the same port, empty
    t_up = time.monotonic()

    after = _submit(client, 999)  # the queue takes jobs again
    assert after.status_code == 202, after.text
    accepted.append(after.json()["id"])

    completed, failed, lost = wait_finished(client, accepted, 300)
    t_done = time.monotonic() - t0
    back_to_one = True
    try:  # the queue is empty: the runner goes back to 1 replica (downscale_delay_s 10 in configs/cluster.yaml)
        wait_for(lambda: atelier.target_replicas("JobRunnerDeployment") == 1
                 and sum(atelier.cluster.replicas_by_node("JobRunnerDeployment").values()) == 1,
                 120, 0.5, "the job runner back to 1 replica")
    except TimeoutError:
        back_to_one = False
    finally:
        runners.stop.set()
        runners.join()
        runners.sample()  # the state the wait saw: the thread samples once a second
    report(f"\n[broker outage] {OUTAGE_S:.0f}s down; {queued_at_kill} jobs queued at the kill; submissions during "
          f"it (status, seconds): {during}; sync requests during it: {sync}")
    report(f"[broker outage] accepted={len(accepted)} completed={len(completed)} failed={len(failed)} lost={len(lost)}; "
          f"all done {time.monotonic() - t_up:.1f}s after the broker came back")
    report(f"[broker outage] job runner replicas Serve wanted over time (s since the first submit, count): "
           f"{runners.samples}; all jobs done at {t_done:.1f}s")
    assert not lost, f"accepted jobs neither completed nor failed: {lost}"
    assert not failed, failed
    assert queued_at_kill > 0  # the case that matters: messages that were only in the broker
    assert 200 in sync, sync  # the synchronous path does not need the broker
    assert all(seconds < 30 for _, seconds in during), during  # refused promptly, not hung on the broker
    wanted = [n for _, n in runners.samples] or [0]
    assert max(wanted) >= 2 and back_to_one, runners.samples  # up on the queue's length, and back down
