"""The job runner's autoscaling policy reads the Redis queue's length (Ray's async-inference policy),
with ${VARS} in the broker URL expanded; an unreachable broker is refused by name. No Ray needed."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from graphs.job_runner import JobQueueAutoscalingPolicy, check_broker
from local.cluster import RedisServer
from tests.cluster.conftest import _require_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


def test_policy_scales_on_queue_length(redis_server, monkeypatch):
    import redis

    monkeypatch.setenv("TEST_REDIS_HOST", f"127.0.0.1:{redis_server.port}")
    client = redis.Redis.from_url(f"{redis_server.url}/0")
    client.delete("atelier-jobs")
    client.rpush("atelier-jobs", *[f"job-{i}" for i in range(20)])
    policy = JobQueueAutoscalingPolicy(broker_url="redis://${TEST_REDIS_HOST}/0", queue_name="atelier-jobs",
                                       poll_interval_s=0)
    ctx = SimpleNamespace(current_num_replicas=1, total_num_requests=0, aggregated_metrics={},
                          config=SimpleNamespace(get_target_ongoing_requests=lambda: 4))

    async def decide():
        policy(ctx)  # starts a poll of the broker
        await asyncio.sleep(0.5)
        return policy(ctx)

    desired, info = asyncio.run(decide())
    assert info["queue_length"] == 20
    assert desired == 5  # 20 queued jobs / 4 per replica; Serve clamps to max_replicas
    client.delete("atelier-jobs")


def test_unreachable_broker_is_named():
    with pytest.raises(RuntimeError, match=r"Redis broker at 127\.0\.0\.1:9 is unreachable \(queue.broker_url\)"):
        check_broker("redis://127.0.0.1:9/0", timeout_s=1)
    check_broker("sqla+sqlite:////tmp/x.db")  # not Redis: nothing to check
