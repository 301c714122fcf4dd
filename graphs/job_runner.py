"""Job consumer: runs durable jobs taken from the queue engine (Ray Serve async inference, Celery).

The ingress writes the job record and enqueues `atelier.run_job(job_id)` before it answers, so a
job is durable before its id is returned. A replica of this deployment runs the job's pipeline
(graphs.pipelines), calling the model deployments through DeploymentHandles, and is the only
writer of the record while the job runs; cancel arrives as a separate marker.

A job is never silently lost:
- a model replica that dies mid-call is retried on another replica, up to `max_attempts`;
- a runner replica that dies stops heartbeating; the reaper on any surviving or replacement
  replica re-enqueues the job or, out of attempts, fails it with a clear error. This matters
  because with the SQL broker a message taken by a dead worker is never redelivered.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from pydantic import BaseModel, Field
from ray.serve.schema import CeleryAdapterConfig, TaskProcessorConfig
from ray.serve.task_consumer import task_handler

from deployments.errors import AtelierError, JobCancelledError
from deployments import metrics
from graphs.payloads import JobPayload, parse_payload
from graphs.registry import JOB_PIPELINES
from storage.fs import Storage
from storage.assets import AssetIndex, Retention, RetentionConfig, default_index_path
from storage.jobs import JobStore
from storage.jobs import TERMINAL_STATUSES, JobError, JobOutput, JobRecord

logger = logging.getLogger("ray.serve")

RUN_JOB_TASK = "atelier.run_job"
# Celery's default retries a publish 3 times; each try against a dead broker can wait on a connect
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


class JobQueueConfig(BaseModel):
    broker_url: str = Field(description="Celery broker: sqla+sqlite:////abs/broker.db locally, redis://… in production.")
    backend_url: str = Field(description="Celery result backend: db+sqlite:////abs/results.db or redis://….")
    queue_name: str = "atelier-jobs"
    concurrency: int = Field(4, ge=1, description="Jobs one runner replica runs at once.")
    heartbeat_s: float = Field(2.0, gt=0)
    lease_s: float = Field(30.0, gt=0, description="A running job silent for this long is taken as lost.")
    reap_interval_s: float = Field(5.0, gt=0)
    max_attempts: int = Field(2, ge=1)
    max_queue_depth: int = Field(1000, ge=1, description="Unfinished jobs past which submission gets 503.")
    backpressure_wait_s: float = Field(
        600.0, ge=0, description="How long a job waits out full model queues (503s) before it fails.")
    consumer_stall_s: float = Field(
        60.0, gt=0, description=(
            "A runner with free slots while jobs wait in the Redis queue for this long has a consumer "
            "that stopped taking work (Celery's, after a broker outage): its health check fails and "
            "Serve replaces it. Redis only."))
    stranded_s: float = Field(
        60.0, gt=0, description=(
            "A job still queued this long after it was sent, while the Redis queue is empty, has its "
            "message held by a consumer that stopped without running it (Celery's unacknowledged "
            "messages come back only after Kombu's one-hour visibility timeout): it is sent again "
            "under a new task id. Redis only."))
    drain_s: float = Field(
        120.0, ge=0, description=(
            "On shutdown (a scale-down, a redeploy), how long a runner waits for the jobs it runs to "
            "finish before it stops. Serve picks the replica to stop by Serve requests, which jobs are "
            "not, so without this a scale-down cut running jobs (the reaper re-enqueued them, each at the "
            "cost of an attempt). The deployment's graceful_shutdown_timeout_s (default drain_s + 15) "
            "must exceed it."))
    polling_interval_s: float | None = Field(
        0.05, gt=0, le=10, description=(
            "How often a polling broker (Kombu's virtual transports: the SQLite broker) looks for new "
            "jobs; Kombu's default is 1 s. Redis pushes, so this does not apply there. None: Kombu's default."))

    def task_processor_config(self) -> TaskProcessorConfig:
        broker_url = os.path.expandvars(self.broker_url)
        # One message reserved per running thread: a dead worker then strands only the jobs it was
        # running, which the reaper recovers.
        app_config: dict[str, Any] = {"worker_prefetch_multiplier": 1, "broker_connection_retry_on_startup": True,
                                      # a submission while the broker is down is refused within seconds
                                      # (503 + Retry-After), not held by publish retries
                                      "task_publish_retry_policy": PUBLISH_RETRY_POLICY}
        # Redis: a bounded connect (redis-py's default is none), so a publish to a dead broker fails in
        # seconds. Not socket_timeout: the consumer's blocking reads must not time out. (Not for the
        # SQLite broker, whose channel hands unknown options to create_engine.)
        redis_options = ({"socket_connect_timeout": 2} if broker_url.startswith(("redis://", "rediss://")) else None)
        return TaskProcessorConfig(
            queue_name=self.queue_name,
            adapter_config=CeleryAdapterConfig(
                broker_url=broker_url,
                backend_url=os.path.expandvars(self.backend_url),
                app_custom_config=app_config,
                broker_transport_options=redis_options,
                # The job record holds the outcome; nothing reads Celery's result, so none is stored.
                task_custom_config={"ignore_result": True},
            ),
            # Failures are recorded on the job itself; the task never asks Celery to retry.
            max_retries=0,
        )


RUNNING_JOBS_METRIC = "running_jobs"  # each runner's, for the autoscaling policy


class JobQueueAutoscalingPolicy:
    """Ray's async-inference policy (queue length in the broker + Serve requests, against
    `target_ongoing_requests` per replica), with `${VARS}` in the broker URL expanded.

    Jobs reach `JobRunnerDeployment` through the queue, not through Serve, so Serve's default policy
    sees no load and never scales it. The config names this class in the deployment's
    `autoscaling_config.policy` with `policy_kwargs` {broker_url, queue_name, poll_interval_s}.
    The Serve controller (on the head node) runs it, so the URL expands from the head node's
    environment (`ray start`'s), as the replicas' queue URLs expand from theirs. Only brokers that
    Ray's policy can measure count (Redis, RabbitMQ); with the SQLite broker the default policy stays.

    Ray's class is imported here, not at module level: its broker client needs `tornado` (not a
    dependency of ray[serve]), and only the controller running this policy needs it.
    """

    def __init__(self, broker_url: str, queue_name: str, **kwargs: Any):
        from ray.serve.async_inference_autoscaling_policy import AsyncInferenceAutoscalingPolicy

        self._policy = AsyncInferenceAutoscalingPolicy(
            broker_url=os.path.expandvars(broker_url), queue_name=queue_name, **kwargs)

    def __call__(self, ctx):
        """Ray's answer, plus the jobs the replicas run (`record_autoscaling_stats`): Celery holds a
        running job's message outside the queue, so Ray's policy alone sees an empty queue as no
        work and scales busy runners down."""
        desired, state = self._policy(ctx)
        running = sum((ctx.aggregated_metrics or {}).get(RUNNING_JOBS_METRIC, {}).values())
        if ctx.current_num_replicas and running:
            desired += running / ctx.config.get_target_ongoing_requests()
        return desired, {**state, "running_jobs": running}


def check_broker(broker_url: str, timeout_s: float = 5.0) -> None:
    """Refuse to start a replica whose Redis broker cannot be reached, naming the URL.

    Celery retries a broker connection forever (`broker_connection_retry_on_startup`), so a wrong
    host would leave a replica that looks healthy and runs nothing; failing here puts the reason
    in `serve status`. Only Redis URLs are checked (the SQLite broker is a local file).
    """
    if not broker_url.startswith(("redis://", "rediss://")):
        return
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except Exception as exc:
        safe = redis.connection.parse_url(broker_url)
        where = f"{safe.get('host', '?')}:{safe.get('port', 6379)}"
        raise RuntimeError(f"the job queue's Redis broker at {where} is unreachable "
                           f"(queue.broker_url): {type(exc).__name__}: {exc}") from None
    finally:
        client.close()


def apply_polling_interval(broker_url: str, seconds: float | None) -> None:
    """How often this process's consumer polls a SQLite (SQLAlchemy) broker.

    Kombu's virtual transports sleep `Transport.polling_interval` (1 s) between empty polls. The
    usual knob, `broker_transport_options={"polling_interval": ...}`, breaks this transport: kombu
    5.7's SQLAlchemy channel passes every option it does not know to `sqlalchemy.create_engine`,
    which refuses it, so every enqueue fails. The class attribute is what that option would set.
    Only the consumer polls; producers (the ingress) never read it.
    """
    if seconds is None or not broker_url.startswith("sqla+"):
        return
    from kombu.transport import sqlalchemy

    sqlalchemy.Transport.polling_interval = seconds


def new_task_id() -> str:
    return str(uuid.uuid4())


def send_job(adapter, record: JobRecord) -> None:
    """Enqueue a persisted record under its task id; a task finding another id on the record is stale."""
    # ignore_result: the job record holds the outcome. Without it Celery subscribes to the result
    # backend on every send; after a Redis outage that subscriber gives up for good ("Retry limit
    # exceeded while trying to reconnect to the Celery result store backend"), failing every later
    # submission through that replica (found by tests/cluster/test_2_broker_outage.py).
    adapter.enqueue_task_sync(RUN_JOB_TASK, kwargs={"job_id": record.id}, task_id=record.task_id, ignore_result=True)


def enqueue_job(adapter, store: JobStore, record: JobRecord) -> str:
    """Enqueue an existing record again: persist it queued under a new task id, then send it.

    The task id goes first, so that the old message (if one survives) is stale when it arrives. If
    the send fails (the broker is down) the record is put back as it was, so that the next reaper
    pass finds it again, and the error is raised.
    """
    before = record.model_copy(deep=True)
    record.status, record.task_id = "queued", new_task_id()
    store.save(record)
    try:
        send_job(adapter, record)
    except Exception:
        store.save(before)
        record.status, record.task_id = before.status, before.task_id
        raise
    return record.task_id


# A key every runner keeps in a Redis broker. Its absence means the broker lost what it held (a
# restart without persistence, a flush, a failover to an empty replica), queued jobs' messages included.
BROKER_SENTINEL_KEY = "atelier:broker-sentinel"


def claim_broker_loss(broker_url: str, timeout_s: float = 2.0) -> bool:
    """True once after a Redis broker lost its data: sets the sentinel key back (SET NX), so exactly one
    caller sees each loss. False while the key is there, and always for brokers that keep their
    messages in a durable file (the SQLite broker). Raises when the broker cannot be reached."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return False
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return bool(client.set(BROKER_SENTINEL_KEY, str(time.time()), nx=True))
    finally:
        client.close()


def redis_queue_length(broker_url: str, queue_name: str) -> int | None:
    """Messages waiting in a Redis broker's queue (what Ray's async-inference policy reads too); None
    for other brokers, or when the broker cannot be reached."""
    if not broker_url.startswith(("redis://", "rediss://")):
        return None
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        return int(client.llen(queue_name))
    except redis.RedisError:
        return None
    finally:
        client.close()


def release_broker_loss(broker_url: str) -> None:
    """Undo a claim whose recovery did not finish, so that the next pass (here or elsewhere) retries it."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.delete(BROKER_SENTINEL_KEY)
    except Exception:  # unreachable again: it comes back empty, and the next claim sees that anyway
        logger.warning("could not release the broker sentinel", exc_info=True)
    finally:
        client.close()


class ReplicaLostError(AtelierError):
    status_code = 503
    error_type = "replica_lost"


def is_backpressure(exc: BaseException) -> bool:
    from ray.serve.exceptions import BackPressureError

    return isinstance(exc, BackPressureError)


def is_replica_failure(exc: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError))


class JobContext:
    """The running job as its pipeline sees it: progress by stage and step, outputs, cancel."""

    def __init__(self, store: JobStore, record: JobRecord, write_interval_s: float = 0.2):
        self.store = store
        self.record = record
        self._lock = threading.Lock()
        self._write_interval_s = write_interval_s
        self._last_write = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._payload: JobPayload | None = None

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def payload(self) -> JobPayload:
        """The record's request as its kind's typed payload (graphs.payloads), parsed on first use,
        inside the pipeline: a request that does not fit its kind fails the job with the reason."""
        if self._payload is None:
            self._payload = parse_payload(self.record.kind, self.record.request)
        return self._payload

    def save(self, force: bool = True, **fields: Any) -> None:
        with self._lock:
            for name, value in fields.items():
                setattr(self.record, name, value)
            now = time.time()
            if force or now - self._last_write >= self._write_interval_s:
                self.record.heartbeat_at = now
                self.record = self.store.save(self.record)
                self._last_write = now

    def start_stage(self, stage: str) -> None:
        if stage not in self.record.stages:
            self.record.stages.append(stage)
        self.save(stage=stage, stage_progress=0.0, step=None, total_steps=None, progress=self._overall(stage, 0.0))

    def step(self, step: int, total_steps: int) -> None:
        stage = self.record.stage or "run"
        within = 100.0 * step / max(total_steps, 1)
        self.save(force=step >= total_steps, step=step, total_steps=total_steps,
                  stage_progress=within, progress=self._overall(stage, within))

    def add_output(self, output: JobOutput) -> None:
        self.record.outputs.append(output)

    def check_cancelled(self) -> None:
        """Raise JobCancelledError once the cancel marker exists (checked at most every 0.25 s)."""
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check > 0.25:
            self._last_cancel_check = now
            self._cancelled = self.store.is_cancel_requested(self.id)
        if self._cancelled:
            raise JobCancelledError("cancelled by request")

    def heartbeat(self) -> None:
        self.save(force=True)

    def _overall(self, stage: str, within: float) -> float:
        stages = self.record.stages or [stage]
        index = stages.index(stage) if stage in stages else 0
        return round((index + within / 100.0) / len(stages) * 100.0, 2)


class JobRunnerDeployment:
    """Wrapped with `task_consumer` and `serve.deployment` in api.app, where its queue config is known."""

    def __init__(self, queue: JobQueueConfig | dict, storage_root: str, storage_options: dict | None = None,
                 retention: RetentionConfig | dict | None = None, assets_index_dir: str | None = None, **handles: Any):
        self.queue = JobQueueConfig.model_validate(queue)
        check_broker(os.path.expandvars(self.queue.broker_url))
        # before task_consumer's initialize_callable starts the Celery worker, which connects then
        apply_polling_interval(os.path.expandvars(self.queue.broker_url), self.queue.polling_interval_s)
        self.store = JobStore(Storage(storage_root, storage_options))
        self.handles = handles
        self.pipelines = JOB_PIPELINES
        # The asset retention sweep (storage/assets.py) rides the reaper's timer; one runner sweeps per period.
        self.retention = RetentionConfig.model_validate(retention or {})
        self._retention: Retention | None = None
        self._assets_index_dir = assets_index_dir
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._running = 0  # jobs this replica runs now (Celery's threads)
        self._running_lock = threading.Lock()
        self._idle_with_backlog_since: float | None = None
        self._reaper = threading.Thread(target=self._reap_forever, name="job-reaper", daemon=True)
        self._reaper.start()

    # Registered as a Celery task by `task_consumer`; Celery runs it in one of its threads.
    @task_handler(name=RUN_JOB_TASK)
    def run_job(self, job_id: str) -> dict:
        with self._running_lock:
            self._running += 1
        try:
            return self._run_job(job_id)
        finally:
            with self._running_lock:
                self._running -= 1

    def _run_job(self, job_id: str) -> dict:
        from celery import current_task

        task_id = current_task.request.id if current_task else None
        try:
            record = self.store.get(job_id)
        except KeyError:
            logger.warning("job %s has no record; dropping its task", job_id)
            return {"job_id": job_id, "status": "missing"}
        if record.status in TERMINAL_STATUSES or (record.task_id and task_id and record.task_id != task_id):
            return {"job_id": job_id, "status": record.status}  # finished, or superseded by a re-enqueue

        ctx = JobContext(self.store, record)
        if self.store.is_cancel_requested(job_id):
            ctx.save(status="cancelled", finished_at=time.time())
            self.report_queue_depth()
            return {"job_id": job_id, "status": "cancelled"}
        ctx.save(status="in_progress", attempts=record.attempts + 1, started_at=record.started_at or time.time())
        if self.store.is_cancel_requested(job_id):
            # A cancel that came between the check above and the write (the ingress saw the job still
            # queued and marked it cancelled; our write replaced that): honour it before any work.
            ctx.save(status="cancelled", finished_at=time.time())
            self.report_queue_depth()
            return {"job_id": job_id, "status": "cancelled"}

        beat = threading.Event()
        threading.Thread(target=self._heartbeat, args=(ctx, beat), daemon=True).start()
        try:
            self._run_with_retries(ctx)
            ctx.save(status="completed", progress=100.0, stage_progress=100.0, finished_at=time.time(), error=None)
        except JobCancelledError:
            ctx.save(status="cancelled", finished_at=time.time())
        except Exception as exc:  # every failure ends the job with its reason, never a silent loss
            error = exc if isinstance(exc, AtelierError) else None
            logger.exception("job %s failed", job_id)
            body = error.to_body()["error"] if error else {}
            ctx.save(status="failed", finished_at=time.time(),
                     error=JobError(type=error.error_type if error else type(exc).__name__,
                                    message=error.message if error else str(exc) or repr(exc),
                                    **{k: body.get(k) for k in ("param", "code", "category")}))
        finally:
            beat.set()
            record = ctx.record
            metrics.job_finished(record.kind, record.status, (record.finished_at or time.time()) -
                                 (record.started_at or record.created_at))
            self.report_queue_depth()
        return {"job_id": job_id, "status": ctx.record.status}

    def _run_with_retries(self, ctx: JobContext) -> None:
        """Run the job's pipeline; a model replica dying mid-call costs one attempt, not the job.

        A full model queue (Serve's BackPressureError) costs nothing: an accepted job waits it out,
        backing off, for up to `backpressure_wait_s`, rather than fail for load it did not cause.
        """
        pipeline = self.pipelines[ctx.record.kind]
        waited, backoff = 0.0, 0.5
        while True:
            try:
                pipeline(ctx, self.handles)
                return
            except Exception as exc:
                if is_backpressure(exc) and waited < self.queue.backpressure_wait_s:
                    logger.info("job %s: model queue full at stage %r; retrying in %.1f s", ctx.id, ctx.record.stage, backoff)
                    ctx.check_cancelled()
                    time.sleep(backoff)
                    waited, backoff = waited + backoff, min(backoff * 2, 10.0)
                    ctx.check_cancelled()
                    continue
                if not is_replica_failure(exc):
                    raise
                logger.warning("job %s: a replica died on attempt %d/%d: %s", ctx.id, ctx.record.attempts,
                               ctx.record.max_attempts, exc)
                if ctx.record.attempts >= ctx.record.max_attempts:
                    raise ReplicaLostError(
                        f"the replica running stage {ctx.record.stage!r} died; "
                        f"gave up after {ctx.record.attempts} attempts") from exc
                ctx.save(attempts=ctx.record.attempts + 1, outputs=[])

    def _heartbeat(self, ctx: JobContext, stop: threading.Event) -> None:
        while not stop.wait(self.queue.heartbeat_s):
            try:
                ctx.heartbeat()
            except Exception:  # storage hiccup: the next beat tries again
                logger.exception("heartbeat for job %s failed", ctx.id)

    # --- reaper -------------------------------------------------------------------------------

    def _reap_forever(self) -> None:
        while not self._stop.wait(self.queue.reap_interval_s):
            try:
                self.reap_once()
            except Exception:
                logger.exception("job reaper pass failed")
            if self.retention.enabled and not (self._sweeper and self._sweeper.is_alive()):
                # its own thread: an index build or a long sweep never holds up the reaping
                self._sweeper = threading.Thread(target=self.sweep_assets, name="asset-sweeper", daemon=True)
                self._sweeper.start()
            # Also on a timer: jobs leave the queue where no runner sees it (a queued job cancelled
            # through the ingress, one finished by another replica).
            self.report_queue_depth()

    def report_queue_depth(self) -> None:
        """Set the queue depth gauge to the store's count of unfinished jobs.

        Runners are the only reporters: each reports the same store-wide count, so any one series
        (or their max) is the depth. A reporter that stopped reporting (the ingress, which only
        sees submissions) would leave a series stuck at its last value.
        """
        try:
            metrics.queue_depth(self.store.count_active())
        except Exception:  # storage hiccup: the next pass reports again
            logger.debug("queue depth not reported", exc_info=True)

    def reap_once(self) -> list[str]:
        """Recover running jobs whose heartbeat stopped: re-enqueue, or fail when out of attempts.
        Then, if the broker lost its messages, send the queued jobs again (resend_lost_messages)."""
        now = time.time()
        recovered = []
        active = self.store.list_active()
        for record in active:
            if record.status != "in_progress":
                continue
            last_seen = record.heartbeat_at or record.started_at or record.created_at
            if now - last_seen < self.queue.lease_s:
                continue
            if record.attempts < record.max_attempts:
                try:
                    record.task_id = enqueue_job(self._adapter, self.store, record)
                except Exception as exc:  # the broker is down: left as it was, for the next pass
                    logger.warning("job %s lost its runner; could not re-enqueue it yet: %s", record.id, exc)
                    continue
                logger.warning("job %s lost its runner; re-enqueued (attempt %d)", record.id, record.attempts + 1)
            else:
                record.status = "failed"
                record.finished_at = now
                record.error = JobError(
                    type="replica_lost", message=f"the replica running this job stopped after {record.attempts} attempts")
                self.store.save(record)
                logger.warning("job %s lost its runner %d times; failed", record.id, record.attempts)
            recovered.append(record.id)
        self.resend_lost_messages()
        self.resend_stranded_messages([r for r in active if r.status == "queued"])
        return recovered

    def resend_stranded_messages(self, queued: list[JobRecord] | None = None) -> list[str]:
        """Send again each job left queued for `queue.stranded_s` while the Redis queue is empty.

        With one message reserved per free slot (prefetch 1, late acks), a consumer takes a message
        only to run it at once; so a job still queued while nothing waits in the list has its message
        with a consumer that went away without running it (a runner stopped on scale-down, or its
        Celery thread cut short), unacknowledged until Kombu's visibility timeout (an hour). Sent
        again under a new task id, the old message is skipped if it ever comes back. `queued`: the
        queued jobs of this reaper pass's listing (default: listed here)."""
        url = os.path.expandvars(self.queue.broker_url)
        if redis_queue_length(url, self.queue.queue_name) != 0:  # waiting in the list, or not Redis
            return []
        now, resent = time.time(), []
        for record in self.store.list_active() if queued is None else queued:
            if record.status != "queued" or now - record.updated_at < self.queue.stranded_s:
                continue
            try:
                record = self.store.get(record.id)  # a runner may have taken it since the listing
                if record.status != "queued" or now - record.updated_at < self.queue.stranded_s:
                    continue
                enqueue_job(self._adapter, self.store, record)
            except Exception as exc:  # gone, or the broker is down: the next pass looks again
                logger.warning("could not send stranded job %s again: %s", record.id, exc)
                continue
            resent.append(record.id)
        if resent:
            logger.warning("%d jobs were queued for over %.0fs with the queue empty (their messages held by a "
                           "consumer that stopped); sent again: %s", len(resent), self.queue.stranded_s, resent)
        return resent

    def resend_lost_messages(self) -> list[str]:
        """After the broker lost its data (a Redis restarted without persistence), send every queued job
        again. A queued job is durable in storage but its message was only in the broker; without
        this it would stay queued forever. Each goes under a new task id, so a message that did
        survive is stale when it arrives (run_job skips it), and no job runs twice."""
        url = os.path.expandvars(self.queue.broker_url)
        try:
            if not claim_broker_loss(url):
                return []
        except Exception as exc:  # unreachable: the next pass looks again
            logger.debug("broker not reachable for the sentinel check: %s", exc)
            return []
        resent = []
        try:
            for record in self.store.list_active():
                if record.status != "queued":
                    continue
                try:
                    record = self.store.get(record.id)  # a runner may have taken it since the listing
                except KeyError:
                    continue
                if record.status == "queued":
                    enqueue_job(self._adapter, self.store, record)
                    resent.append(record.id)
        except Exception:
            release_broker_loss(url)  # not finished: the next pass claims the loss again
            raise
        if resent:
            logger.warning("the job broker lost its messages; sent %d queued jobs again: %s", len(resent), resent)
        return resent

    def sweep_assets(self):
        """Apply the retention policy (or report what it would delete) when this period's lease is ours."""
        if not self.retention.enabled or not self.retention.kinds:
            return None
        try:
            if self._retention is None:
                storage = self.store.storage
                index = AssetIndex(storage, default_index_path(storage, self._assets_index_dir, "runner"))
                self._retention = Retention(index, self.retention)
            return self._retention.sweep()
        except Exception:
            logger.exception("asset retention sweep failed")
            return None

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the jobs this replica runs now."""
        return {RUNNING_JOBS_METRIC: float(self._running)}

    def check_health(self) -> None:
        if not self._reaper.is_alive():
            raise RuntimeError("job reaper thread died")
        self._check_consumer()

    def _check_consumer(self) -> None:
        """Fail the health check when jobs wait in the queue while this replica has free slots, for
        longer than `consumer_stall_s`: its Celery consumer stopped taking work (seen after a Redis
        restart: it logged its reconnect attempts and then took nothing). Serve then replaces the
        replica; jobs it was running are re-enqueued by the reaper when their heartbeat stops."""
        waiting = redis_queue_length(os.path.expandvars(self.queue.broker_url), self.queue.queue_name)
        if not waiting or self._running >= self.queue.concurrency:
            self._idle_with_backlog_since = None
            return
        now = time.monotonic()
        if self._idle_with_backlog_since is None:
            self._idle_with_backlog_since = now
        elif now - self._idle_with_backlog_since > self.queue.consumer_stall_s:
            raise RuntimeError(
                f"the job consumer takes no work: {waiting} jobs have waited in the queue for "
                f"{now - self._idle_with_backlog_since:.0f}s while this runner runs {self._running} of "
                f"{self.queue.concurrency}")

    def __del__(self):
        self._stop.set()
        self.drain()

    def drain(self) -> int:
        """Wait, at most `queue.drain_s`, for the jobs this replica runs to finish; how many were
        still running. Serve calls `__del__` on shutdown after Ray's task_consumer wrapper has told
        Celery to stop (a warm shutdown: it takes no new job and lets running ones end)."""
        deadline = time.monotonic() + self.queue.drain_s
        if self._running:
            logger.info("job runner stopping: waiting up to %.0fs for %d running jobs", self.queue.drain_s,
                        self._running)
        while self._running and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._running:
            logger.warning("job runner stopping with %d jobs still running after %.0fs: the reaper re-enqueues "
                           "them when their heartbeats stop", self._running, self.queue.drain_s)
        return self._running
