"""The job runner without Ray: pipelines, failures, retries on dead replicas, the reaper."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError

from deployments.errors import InvalidRequestError, JobCancelledError, OverloadedError
from graphs.job_runner import RUN_JOB_TASK, JobContext, JobQueueConfig, JobRunnerDeployment
from storage.fs import Storage
from storage.jobs import JobStore


class FakeQueue:
    def __init__(self):
        self.sent = []

    def enqueue_task_sync(self, name, args=None, kwargs=None, **options):
        self.sent.append((name, kwargs, options.get("task_id")))
        return SimpleNamespace(id=options.get("task_id"))


@pytest.fixture()
def runner(tmp_path, monkeypatch):
    monkeypatch.setattr("celery.current_task", None)
    queue = {"broker_url": "memory://", "backend_url": "cache+memory://", "reap_interval_s": 3600,
             "lease_s": 5, "heartbeat_s": 0.05}
    runner = JobRunnerDeployment(queue, storage_root=str(tmp_path))
    runner._adapter = FakeQueue()
    yield runner
    runner._stop.set()


def with_pipeline(runner, fn):
    runner.pipelines = {"test": fn}
    return runner.store.create("test", {}, max_attempts=2)


def test_completed_job_reports_stages_and_progress(runner):
    def pipeline(ctx, handles):
        for stage in ("one", "two"):
            ctx.start_stage(stage)
            for step in range(1, 5):
                ctx.step(step, 4)

    record = with_pipeline(runner, pipeline)
    assert runner.run_job(record.id)["status"] == "completed"
    done = runner.store.get(record.id)
    assert (done.status, done.progress, done.stages, done.attempts) == ("completed", 100.0, ["one", "two"], 1)
    assert runner.store.count_active() == 0


def test_overall_progress_spans_stages(tmp_path):
    store = JobStore(Storage(str(tmp_path)))
    ctx = JobContext(store, store.create("k", {}, stages=["a", "b"]))
    ctx.start_stage("b")
    ctx.step(2, 4)  # step writes are throttled; the heartbeat persists the latest
    ctx.heartbeat()
    assert store.get(ctx.id).progress == 75.0


def test_failure_is_recorded_with_its_reason(runner):
    def pipeline(ctx, handles):
        raise InvalidRequestError("image is not readable", "image")

    record = with_pipeline(runner, pipeline)
    runner.run_job(record.id)
    failed = runner.store.get(record.id)
    assert failed.status == "failed"
    assert failed.error.type == "invalid_request_error" and "not readable" in failed.error.message
    assert failed.error.param == "image"


def test_a_refused_output_keeps_its_code_and_category_for_the_answer_built_from_the_record(runner):
    from api.images.service import JobFailedError
    from deployments.llm.vision import ContentPolicyError

    def pipeline(ctx, handles):
        raise ContentPolicyError("the image was refused by the content policy (hate)", "prompt", category="hate")

    record = with_pipeline(runner, pipeline)
    runner.run_job(record.id)
    failed = runner.store.get(record.id)
    assert (failed.error.code, failed.error.category, failed.error.param) == ("content_policy_violation", "hate",
                                                                             "prompt")
    answer = JobFailedError.of(failed)  # what a synchronous caller waiting on the job gets
    body = answer.to_body()["error"]
    assert answer.status_code == 400 and body["code"] == "content_policy_violation" and body["category"] == "hate"
    assert body["param"] == "prompt" and "refused" in body["message"]


def test_the_context_parses_the_request_once_into_the_kinds_payload(runner):
    from graphs.payloads import ImageUpscalePayload

    seen = []

    def pipeline(ctx, handles):
        seen.append((ctx.payload, ctx.payload))

    runner.pipelines = {"images.upscale": pipeline}
    record = runner.store.create("images.upscale", {"upscale": {"image_key": "outputs/a.png", "seed": 3}})
    assert runner.run_job(record.id)["status"] == "completed"
    ((first, again),) = seen
    assert first is again and isinstance(first, ImageUpscalePayload) and first.upscale.seed == 3
    assert runner.store.get(record.id).request == {"upscale": {"image_key": "outputs/a.png", "seed": 3}}


def test_a_request_that_does_not_fit_its_kind_fails_the_job_with_the_reason(runner):
    record = runner.store.create("images.generations", {"refine": None})  # no sdxl section
    assert runner.run_job(record.id)["status"] == "failed"
    failed = runner.store.get(record.id)
    assert failed.error.type == "ValidationError" and "sdxl" in failed.error.message


def test_dead_model_replica_is_retried_then_completes(runner):
    calls = []

    def pipeline(ctx, handles):
        calls.append(1)
        if len(calls) == 1:
            raise ActorDiedError()

    record = with_pipeline(runner, pipeline)
    assert runner.run_job(record.id)["status"] == "completed"
    assert len(calls) == 2 and runner.store.get(record.id).attempts == 2


def test_full_model_queue_is_waited_out_without_costing_an_attempt(runner):
    from ray.serve.exceptions import BackPressureError

    calls = []

    def pipeline(ctx, handles):
        calls.append(1)
        if len(calls) <= 2:
            raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

    record = with_pipeline(runner, pipeline)
    assert runner.run_job(record.id)["status"] == "completed"
    assert len(calls) == 3 and runner.store.get(record.id).attempts == 1


def test_full_model_queue_past_the_wait_budget_fails_with_the_reason(runner):
    from ray.serve.exceptions import BackPressureError

    runner.queue.backpressure_wait_s = 0.0

    def pipeline(ctx, handles):
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8)

    record = with_pipeline(runner, pipeline)
    runner.run_job(record.id)
    failed = runner.store.get(record.id)
    assert failed.status == "failed" and "queue" in failed.error.message.lower()


def test_dead_model_replica_every_time_fails_clearly(runner):
    def pipeline(ctx, handles):
        ctx.start_stage("generate")
        raise ActorDiedError()

    record = with_pipeline(runner, pipeline)
    runner.run_job(record.id)
    failed = runner.store.get(record.id)
    assert failed.status == "failed" and failed.error.type == "replica_lost"
    assert "generate" in failed.error.message


def test_cancel_before_start_and_while_running(runner):
    def pipeline(ctx, handles):
        runner.store.request_cancel(ctx.id)
        time.sleep(0.3)
        ctx.check_cancelled()
        raise AssertionError("not reached")

    record = with_pipeline(runner, pipeline)
    assert runner.run_job(record.id)["status"] == "cancelled"
    queued = runner.store.create("test", {})
    runner.store.request_cancel(queued.id)
    assert runner.run_job(queued.id)["status"] == "cancelled"


def test_superseded_task_does_nothing(runner, monkeypatch):
    record = with_pipeline(runner, lambda ctx, handles: pytest.fail("must not run"))
    runner.store.update(record.id, task_id="the-current-task")
    monkeypatch.setattr("celery.current_task", SimpleNamespace(request=SimpleNamespace(id="an-old-task")))
    assert runner.run_job(record.id)["status"] == "queued"


def test_heartbeat_keeps_a_long_job_alive(runner):
    def pipeline(ctx, handles):
        first = runner.store.get(ctx.id).heartbeat_at
        wait_for(lambda: runner.store.get(ctx.id).heartbeat_at > first)  # beats every 0.05 s

    record = with_pipeline(runner, pipeline)
    assert runner.run_job(record.id)["status"] == "completed"


def test_reaper_requeues_a_job_whose_runner_died_then_fails_it(runner):
    record = runner.store.create("test", {}, max_attempts=2)
    stale = time.time() - 60
    runner.store.update(record.id, status="in_progress", attempts=1, heartbeat_at=stale)
    fresh = runner.store.create("test", {})
    runner.store.update(fresh.id, status="in_progress", attempts=1, heartbeat_at=time.time())

    assert runner.reap_once() == [record.id]
    requeued = runner.store.get(record.id)
    assert requeued.status == "queued"
    assert runner._adapter.sent == [(RUN_JOB_TASK, {"job_id": record.id}, requeued.task_id)]

    runner.store.update(record.id, status="in_progress", attempts=2, heartbeat_at=stale)
    assert runner.reap_once() == [record.id]
    lost = runner.store.get(record.id)
    assert lost.status == "failed" and lost.error.type == "replica_lost"
    assert runner.store.get(fresh.id).status == "in_progress"  # a live job is left alone


class DownQueue(FakeQueue):
    """A broker that refuses every message, as one that is down does."""

    def enqueue_task_sync(self, name, args=None, kwargs=None, **options):
        raise ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


def test_a_lost_runners_job_stays_for_the_next_pass_while_the_broker_is_down(runner):
    record = runner.store.create("test", {}, max_attempts=2)
    stale = time.time() - 60
    runner.store.update(record.id, status="in_progress", attempts=1, heartbeat_at=stale, task_id="old")
    runner._adapter = DownQueue()
    assert runner.reap_once() == []
    kept = runner.store.get(record.id)  # as it was: not queued under a task id no message carries
    assert (kept.status, kept.task_id, kept.attempts) == ("in_progress", "old", 1)
    runner._adapter = FakeQueue()  # the broker is back
    assert runner.reap_once() == [record.id]
    requeued = runner.store.get(record.id)
    assert requeued.status == "queued" and runner._adapter.sent == [(RUN_JOB_TASK, {"job_id": record.id},
                                                                     requeued.task_id)]


@pytest.fixture()
def redis_broker(tmp_path):
    from local.cluster import RedisServer

    if RedisServer.executable() is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed (`make redis`); under CI these tests must run")
        pytest.skip("redis-server is not installed (`make redis` installs Debian's)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_queued_jobs_are_sent_again_after_the_broker_lost_its_messages(runner, redis_broker):
    """A Redis broker restarted without persistence has lost every queued job's message: the reaper
    sees its sentinel key gone and sends each queued job again, under a new task id (so a message
    that did survive is skipped as stale). One claim per loss, whichever runner gets it."""
    import redis

    runner.queue.broker_url = redis_broker.url + "/0"
    queued = [runner.store.create("test", {}, task_id=f"t{i}") for i in range(3)]
    running = runner.store.create("test", {})
    runner.store.update(running.id, status="in_progress", attempts=1, heartbeat_at=time.time())

    # a broker without the sentinel (first start, or data lost): every queued job is sent again
    assert sorted(runner.resend_lost_messages()) == sorted(r.id for r in queued)
    again = {r.id: runner.store.get(r.id).task_id for r in queued}
    assert all(task_id and not task_id.startswith("t") for task_id in again.values())
    assert sorted(kwargs["job_id"] for _, kwargs, _ in runner._adapter.sent) == sorted(again)
    assert {task_id for _, _, task_id in runner._adapter.sent} == set(again.values())
    # the sentinel is there now: nothing more, from this runner or another
    other = JobRunnerDeployment(runner.queue.model_dump(), storage_root=runner.store.storage.root)
    other._adapter = FakeQueue()
    assert runner.resend_lost_messages() == [] and other.resend_lost_messages() == []
    other._stop.set()

    # the broker loses its data again; a job taken by a runner meanwhile is left alone
    redis.Redis.from_url(runner.queue.broker_url).flushall()
    runner.store.update(queued[0].id, status="in_progress", attempts=1, heartbeat_at=time.time())
    runner._adapter = FakeQueue()
    assert sorted(runner.reap_once()) == []  # nothing lost its runner; the resend rides the same pass
    assert sorted(kwargs["job_id"] for _, kwargs, _ in runner._adapter.sent) == sorted(r.id for r in queued[1:])

    # a resend that cannot finish (the broker refuses) leaves the jobs as they were and the loss
    # unclaimed, so the next pass tries again
    redis.Redis.from_url(runner.queue.broker_url).flushall()
    before = {r.id: runner.store.get(r.id).task_id for r in queued[1:]}
    runner._adapter = DownQueue()
    with pytest.raises(ConnectionError):
        runner.resend_lost_messages()
    assert {r.id: runner.store.get(r.id).task_id for r in queued[1:]} == before
    assert all(runner.store.get(r.id).status == "queued" for r in queued[1:])
    runner._adapter = FakeQueue()
    assert sorted(runner.resend_lost_messages()) == sorted(r.id for r in queued[1:])


def test_a_runner_idle_beside_a_waiting_queue_fails_its_health_check(runner, redis_broker):
    """A consumer that stopped taking work (Celery's, after a Redis restart) leaves jobs waiting while
    its replica has free slots: past consumer_stall_s the health check fails, so Serve replaces it.
    A busy runner, or an empty queue, is healthy."""
    import redis

    runner.queue.broker_url = redis_broker.url + "/0"
    runner.queue.consumer_stall_s = 0.3
    runner.check_health()  # nothing waits
    redis.Redis(port=redis_broker.port).lpush(runner.queue.queue_name, b"a message")
    runner.check_health()  # the first look only starts the clock
    runner._running = runner.queue.concurrency  # every slot busy: waiting is normal
    time.sleep(0.4)
    runner.check_health()
    runner._running = 1
    runner.check_health()
    time.sleep(0.4)
    with pytest.raises(RuntimeError, match="takes no work: 1 jobs have waited"):
        runner.check_health()
    redis.Redis(port=redis_broker.port).delete(runner.queue.queue_name)  # drained: healthy again
    runner.check_health()


def test_an_unreachable_broker_is_not_taken_as_a_loss(runner):
    from local.cluster import free_port

    runner.queue.broker_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    runner.store.create("test", {})
    assert runner.resend_lost_messages() == [] and runner._adapter.sent == []


# --- the queue depth gauge -------------------------------------------------------------------


def by_outcome(ctx, handles):
    """A pipeline that ends the way the job's request says (kind "test" has no typed payload)."""
    outcome = ctx.record.request["outcome"]
    if outcome == "fail":
        raise InvalidRequestError("image is not readable", "image")
    if outcome == "cancel":
        ctx.store.request_cancel(ctx.id)
        time.sleep(0.3)
        ctx.check_cancelled()


def test_queue_depth_gauge_falls_as_jobs_complete_fail_and_are_cancelled(runner, monkeypatch):
    reported = []
    monkeypatch.setattr("deployments.metrics.queue_depth", reported.append)
    runner.pipelines = {"test": by_outcome}
    jobs = [runner.store.create("test", {"outcome": outcome})
            for outcome in ("complete", "fail", "cancel", "complete", "complete")]

    outcomes = []
    for job in jobs[:4]:
        outcomes.append(runner.run_job(job.id)["status"])
        outcomes.append(reported[-1])
    assert outcomes == ["completed", 4, "failed", 3, "cancelled", 2, "completed", 1]
    assert runner.store.count_active() == 1


def test_queue_depth_gauge_follows_the_store_on_a_timer(tmp_path, monkeypatch):
    """A job can leave the queue where no runner sees it (a queued job cancelled through the ingress):
    the reaper's timer reports the store's count all the same."""
    reported = []
    monkeypatch.setattr("deployments.metrics.queue_depth", reported.append)
    queue = {"broker_url": "memory://", "backend_url": "cache+memory://", "reap_interval_s": 0.05}
    runner = JobRunnerDeployment(queue, storage_root=str(tmp_path))
    runner._adapter = FakeQueue()
    try:
        first, second = runner.store.create("test", {}), runner.store.create("test", {})
        wait_for(lambda: reported and reported[-1] == 2)
        runner.store.request_cancel(first.id)
        wait_for(lambda: reported[-1] == 1)
        runner.store.update(second.id, status="completed", finished_at=time.time())  # by another replica
        wait_for(lambda: reported[-1] == 0)
    finally:
        runner._stop.set()


def wait_for(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- the job queue's maximum depth (JobsService.submit) -------------------------------------


@pytest.fixture()
def submit(tmp_path):
    """The API's JobsService.submit on a queue of max_queue_depth 3, with a fake queue, without Ray."""
    from api.files.service import FilesService
    from api.jobs.service import JobsService
    from graphs.payloads import ImageGenerationPayload

    storage = Storage(str(tmp_path))
    service = JobsService(JobStore(storage), FakeQueue(),
                          JobQueueConfig(broker_url="memory://", backend_url="cache+memory://", max_queue_depth=3),
                          FilesService(storage, presign_urls=False))

    def submit(seed: int):
        return service.submit(ImageGenerationPayload.create(sdxl={"prompt": "a fox", "seed": seed}))

    submit.service = service
    return submit


def test_job_queue_takes_jobs_up_to_its_max_depth_and_refuses_one_past_it(submit):
    jobs, queue = submit.service.jobs, submit.service.queue
    accepted = [submit(seed) for seed in range(3)]  # the third brings the queue to exactly its limit
    assert [job.status for job in accepted] == ["queued"] * 3
    assert jobs.count_active() == 3 and [kwargs["job_id"] for _, kwargs, _ in queue.sent] == [j.id for j in accepted]

    with pytest.raises(OverloadedError) as refused:
        submit(3)
    assert refused.value.status_code == 503 and refused.value.error_type == "overloaded_error"
    assert int(refused.value.headers["Retry-After"]) >= 1
    assert "3 unfinished jobs" in refused.value.message
    # refused before anything was written or enqueued
    assert jobs.count_active() == 3 and len(jobs.list(limit=10)) == 3 and len(queue.sent) == 3


def test_a_finished_job_frees_its_place_in_a_full_queue(submit):
    jobs = submit.service.jobs
    accepted = [submit(seed) for seed in range(3)]
    jobs.update(accepted[0].id, status="completed", finished_at=time.time())
    assert submit(3).status == "queued"
    with pytest.raises(OverloadedError):
        submit(4)
    assert jobs.count_active() == 3


def test_a_submitted_job_is_written_once_with_the_task_id_it_is_sent_under(submit, monkeypatch):
    from storage.keys import job_key

    storage = submit.service.jobs.storage
    writes, put_json = [], storage.put_json
    monkeypatch.setattr(storage, "put_json", lambda key, value: (writes.append(key), put_json(key, value))[1])
    job = submit(1)
    ((_, kwargs, task_id),) = submit.service.queue.sent
    assert kwargs == {"job_id": job.id} and task_id
    assert writes == [job_key(job.id)]  # one record write at submit, not one more for the task id
    assert submit.service.jobs.get(job.id).task_id == task_id


def test_the_queue_config_reaches_celery_and_a_real_sqlite_broker_takes_jobs(tmp_path, monkeypatch):
    from kombu import Connection
    from kombu.transport import sqlalchemy
    from ray.serve.task_consumer import instantiate_adapter_from_config

    monkeypatch.setattr(sqlalchemy.Transport, "polling_interval", sqlalchemy.Transport.polling_interval)
    broker = f"sqla+sqlite:///{tmp_path}/broker.db"
    config = JobQueueConfig(broker_url=broker, backend_url=f"db+sqlite:///{tmp_path}/results.db")
    assert config.task_processor_config().adapter_config.task_custom_config == {"ignore_result": True}
    # A real enqueue through Ray's Celery adapter: a transport option this broker cannot take fails here.
    adapter = instantiate_adapter_from_config(config.task_processor_config())
    adapter.enqueue_task_sync(RUN_JOB_TASK, kwargs={"job_id": "job_x"}, task_id="t1")
    # The consumer's process polls every 0.05 s (Kombu's default: 1 s).
    runner = JobRunnerDeployment(config, storage_root=str(tmp_path / "storage"))
    try:
        with Connection(broker) as connection:
            assert connection.transport.polling_interval == 0.05
            message = connection.SimpleQueue(config.queue_name).get(timeout=5)
            assert message.headers["id"] == "t1" and message.headers["task"] == RUN_JOB_TASK
    finally:
        runner._stop.set()


class BlockedStream:
    """A streamed handle call that sends nothing (a request queued behind a busy model) until cancelled."""

    def __init__(self):
        self.cancelled = threading.Event()

    def __iter__(self):
        if not self.cancelled.wait(30):
            raise AssertionError("never cancelled")
        raise RuntimeError("RequestCancelledError")  # what Serve raises in the iterating thread

    def cancel(self):
        self.cancelled.set()


def test_a_cancel_reaches_a_call_that_sends_no_events():
    from graphs.pipelines import drain_stream

    requested = []

    def check_cancelled():
        if requested:
            raise JobCancelledError("cancelled by request")

    stream = BlockedStream()
    threading.Timer(0.1, lambda: requested.append(True)).start()  # the client cancels while it waits
    with pytest.raises(JobCancelledError):
        drain_stream(stream, lambda step, total: None, check_cancelled, cancel_poll_s=0.02)
    assert stream.cancelled.is_set()


def test_a_cancel_racing_the_start_of_a_queued_job_wins(runner, monkeypatch):
    """Issue 18, finding 12 (races): the ingress cancels a job that is still queued at the moment the
    runner starts it. The runner checked the marker (none yet), the ingress then wrote it and set
    the record to cancelled, and the runner's `in_progress` write replaced that, so the job ran
    (and a quick one ended `completed` after its client was told `cancelled`). Now the runner looks
    again after its write and ends it cancelled before any work."""
    ran = []
    record = with_pipeline(runner, lambda ctx, handles: ran.append(ctx.id))
    checks = iter([False, True])  # the marker is absent at the first check, there at the second
    real = runner.store.is_cancel_requested

    def racing(job_id):
        seen = next(checks, None)
        if seen:
            runner.store.request_cancel(job_id)  # the cancel lands now, between the two checks
        return real(job_id) if seen is None else seen

    monkeypatch.setattr(runner.store, "is_cancel_requested", racing)
    assert runner.run_job(record.id)["status"] == "cancelled"
    assert not ran and runner.store.get(record.id).status == "cancelled"


def test_an_enqueue_to_a_dead_redis_broker_fails_within_seconds(redis_broker):
    """The ingress answers 503 + Retry-After while the broker is down: the publish must give up
    promptly (bounded retries and socket waits), not hold the request for Celery's defaults; and
    once the broker is back (empty), the same adapter publishes again, every time (the result
    backend, which nothing reads, is never subscribed to)."""
    from ray.serve.task_consumer import instantiate_adapter_from_config

    from graphs.job_runner import send_job

    config = JobQueueConfig(broker_url=redis_broker.url + "/0", backend_url=redis_broker.url + "/1")
    adapter = instantiate_adapter_from_config(config.task_processor_config())
    job = lambda i: SimpleNamespace(id=f"job_{i}", task_id=f"t{i}")  # noqa: E731
    send_job(adapter, job(1))  # up: taken
    redis_broker.stop()
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        send_job(adapter, job(2))
    took = time.monotonic() - started
    assert took < 8, f"the publish to a dead broker took {took:.1f}s to fail ({raised.value!r})"
    redis_broker.start()  # back, empty
    for i in range(3, 8):
        send_job(adapter, job(i))
    import redis

    assert redis.Redis(port=redis_broker.port).llen(config.queue_name) == 5


def test_a_stopping_runner_lets_its_running_job_finish(runner):
    """Serve stops a runner on scale-down without regard to the jobs it runs (they are not Serve
    requests): its destructor waits for them, up to queue.drain_s."""
    release, started = threading.Event(), threading.Event()

    def pipeline(ctx, handles):
        started.set()
        assert release.wait(10)

    record = with_pipeline(runner, pipeline)
    job = threading.Thread(target=runner.run_job, args=(record.id,))
    job.start()
    assert started.wait(10)
    stopping = threading.Thread(target=runner.__del__)
    stopping.start()
    stopping.join(0.5)
    assert stopping.is_alive()  # still waiting for the job
    release.set()
    stopping.join(10)
    job.join(10)
    assert not stopping.is_alive() and runner.store.get(record.id).status == "completed"


def test_a_stopping_runner_waits_at_most_drain_s(runner):
    release = threading.Event()
    runner.queue.drain_s = 0.3
    record = with_pipeline(runner, lambda ctx, handles: release.wait(10))
    job = threading.Thread(target=runner.run_job, args=(record.id,))
    job.start()
    try:
        deadline = time.monotonic() + 10
        while runner._running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        assert runner.drain() == 1  # one job still running: the reaper re-enqueues it when its heartbeat stops
        assert 0.25 < time.monotonic() - started < 2
    finally:
        release.set()
        job.join(10)



def test_the_autoscaling_policy_counts_running_jobs_beside_the_queue(runner, redis_broker):
    """A running job's message is outside the Redis list (Celery holds it unacked), so the queue
    alone reads as no work: the policy adds the jobs the replicas report running."""
    import asyncio

    import redis
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    from graphs.job_runner import RUNNING_JOBS_METRIC, JobQueueAutoscalingPolicy

    url = redis_broker.url + "/0"
    redis.Redis.from_url(url).rpush("atelier-jobs", *[b"{}"] * 4)  # 4 jobs waiting
    policy = JobQueueAutoscalingPolicy(url, "atelier-jobs", poll_interval_s=0)
    runner._running = 3
    assert runner.record_autoscaling_stats() == {RUNNING_JOBS_METRIC: 3.0}

    def ask(running_by_replica: dict) -> tuple[float, dict]:
        ctx = AutoscalingContext(
            deployment_id=None, deployment_name="JobRunnerDeployment", app_name="atelier",
            current_num_replicas=2, target_num_replicas=2, running_replicas=[], total_num_requests=0,
            total_queued_requests=0, aggregated_metrics={RUNNING_JOBS_METRIC: running_by_replica},
            raw_metrics=None, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4,
            policy_state={}, last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(),
            config=AutoscalingConfig(min_replicas=1, max_replicas=4, target_ongoing_requests=4))

        async def twice():  # the first call starts the broker poll, the second sees its answer
            policy(ctx)
            await asyncio.sleep(0.5)
            return policy(ctx)

        return asyncio.run(twice())

    desired, state = ask({"a": 4.0, "b": 4.0})  # 8 running on 2 replicas, 4 queued: 3 replicas' worth
    assert (state["queue_length"], state["running_jobs"]) == (4, 8.0) and desired == pytest.approx(3.0)
    redis.Redis.from_url(url).delete("atelier-jobs")
    desired, state = ask({"a": 4.0, "b": 3.0})  # queue empty, both busy: stay at 2, not down to 0
    assert state["queue_length"] == 0 and desired == pytest.approx(7 / 4)


def test_a_job_whose_message_a_stopped_consumer_holds_is_sent_again(runner, redis_broker):
    """A consumer takes a message only to run it at once (one per free slot), so a job still queued
    while the Redis list is empty has its message with a consumer that stopped: after
    queue.stranded_s it is sent again, under a new task id (the old message is stale if it returns)."""
    import redis

    runner.queue.broker_url = redis_broker.url + "/0"
    runner.queue.stranded_s = 60
    stranded = runner.store.create("test", {}, task_id="t-held")
    running = runner.store.create("test", {})
    runner.store.update(running.id, status="in_progress", attempts=1, heartbeat_at=time.time())
    assert runner.resend_stranded_messages() == []  # queued only just now
    runner.queue.stranded_s = 0.2
    time.sleep(0.3)
    redis.Redis.from_url(runner.queue.broker_url).rpush(runner.queue.queue_name, b"{}")
    assert runner.resend_stranded_messages() == []  # messages wait in the list: it may be one of them
    redis.Redis.from_url(runner.queue.broker_url).delete(runner.queue.queue_name)
    assert runner.resend_stranded_messages() == [stranded.id]
    again = runner.store.get(stranded.id)
    assert again.status == "queued" and again.task_id != "t-held"
    assert runner._adapter.sent == [(RUN_JOB_TASK, {"job_id": stranded.id}, again.task_id)]
    runner.queue.stranded_s = 60
    assert runner.resend_stranded_messages() == []  # just sent: not stranded again until stranded_s passes
    assert runner.store.get(running.id).status == "in_progress"
