"""The S3 server dies during writes: no partial object ever shows, and jobs never report success.

"Dies" as the clients see it: a TCP proxy in front of moto is shut, dropping every live
connection mid-body and refusing new ones. moto keeps its state behind the proxy, so the test
can look at exactly what became visible.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from graphs.job_runner import JobRunnerDeployment
from storage.fs import Storage
from storage.jobs import JobOutput
from storage.keys import output_key
from tests.s3_server import S3Server

BUCKET = "outage"
OBJECT_BYTES = 2**20


class CuttableProxy:
    """Forwards 127.0.0.1:port to the S3 server until `cut()`, which drops every connection."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()  # refused while the server is "down"
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._sockets.clear()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def content_for(index: int) -> bytes:
    seed = hashlib.sha256(str(index).encode()).digest()
    return (seed * (OBJECT_BYTES // len(seed) + 1))[:OBJECT_BYTES]


@pytest.fixture()
def s3_behind_proxy():
    with S3Server() as s3:
        s3.make_bucket(BUCKET)
        proxy = CuttableProxy(int(s3.endpoint_url.rsplit(":", 1)[1]))
        # short timeouts and few retries: a dead endpoint must fail calls, not hang them
        options = {**s3.storage_options(),
                   "config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}}}
        options["client_kwargs"] = {**options["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        through_proxy = Storage(f"s3://{BUCKET}/root", options)
        direct = Storage(f"s3://{BUCKET}/root", s3.storage_options())
        try:
            yield proxy, through_proxy, direct
        finally:
            proxy.close()


def test_no_partial_object_is_ever_visible_and_acknowledged_writes_survive(s3_behind_proxy):
    proxy, storage, direct = s3_behind_proxy
    outcomes: dict[int, str] = {}
    counter = iter(range(10**6))
    counter_lock = threading.Lock()
    stop = threading.Event()
    torn: list[str] = []

    def writer() -> None:
        while not stop.is_set():
            with counter_lock:
                index = next(counter)
            try:
                storage.put_bytes(f"objects/{index}.bin", content_for(index))
                outcomes[index] = "ok"
            except Exception as exc:  # the server is gone: the write says so
                outcomes[index] = f"raised {type(exc).__name__}"

    def check_visible() -> int:
        """Every object a reader can see is whole; returns how many it saw."""
        keys = direct.list("objects/")
        for key in keys:
            index = int(key.rsplit("/", 1)[1].split(".")[0])
            data = direct.get_bytes(key)
            if data != content_for(index):
                torn.append(f"{key}: {len(data)} bytes")
        return len(keys)

    def reader() -> None:
        while not stop.is_set():
            check_visible()
            time.sleep(0.05)

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(o == "ok" for o in list(outcomes.values())) < 3:
        assert time.monotonic() < deadline, f"no write went through before the outage: {sorted(set(outcomes.values()))[:3]}"
        time.sleep(0.05)
    proxy.cut()  # mid-write: three bodies are in flight
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(90)
        assert not thread.is_alive(), "a call hung on the dead server"
    proxy.restore()

    raised = [i for i, o in outcomes.items() if o.startswith("raised")]
    assert raised, "no write failed while the server was down"
    assert not torn, f"partial objects were visible: {torn}"
    visible = check_visible()
    assert not torn, f"partial objects are visible after the outage: {torn}"
    for index, outcome in outcomes.items():
        if outcome == "ok":  # acknowledged means stored, whole
            assert direct.get_bytes(f"objects/{index}.bin") == content_for(index)
    print(f"{len(outcomes)} writes: {len(outcomes) - len(raised)} acknowledged, {len(raised)} failed; "
          f"{visible} objects visible, none partial")
    # and the same client works again once the server is back
    storage.put_bytes("objects/after.bin", b"back")
    assert direct.get_bytes("objects/after.bin") == b"back"


def test_a_job_whose_storage_dies_is_never_reported_completed(s3_behind_proxy, monkeypatch):
    proxy, storage, direct = s3_behind_proxy
    monkeypatch.setattr("celery.current_task", None)
    queue = {"broker_url": "memory://", "backend_url": "cache+memory://", "reap_interval_s": 3600,
             "lease_s": 1, "heartbeat_s": 0.1}
    runner = JobRunnerDeployment(queue, storage_root=storage.root, storage_options=storage.storage_options)
    requeued = []
    # The broker stands in for Celery (Serve's task_consumer sets _adapter in a replica); the real
    # enqueue_job still persists the re-queued record before it sends the task.
    runner._adapter = SimpleNamespace(
        enqueue_task_sync=lambda name, kwargs=None, **options: requeued.append(kwargs["job_id"]))
    reached_write, server_down = threading.Event(), threading.Event()

    def pipeline(ctx, handles):
        ctx.start_stage("generate")
        ctx.step(1, 2)
        reached_write.set()
        assert server_down.wait(30)  # the server dies here, before the write below
        key = output_key(ctx.id, 0)
        runner.store.storage.put_bytes(key, content_for(7))
        ctx.add_output(JobOutput(key=key, content_type="application/octet-stream"))

    runner.pipelines = {"test": pipeline}
    record = runner.store.create("test", {}, max_attempts=2)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(outcome=_run(runner, record.id)))
    worker.start()
    assert reached_write.wait(30)
    proxy.cut()
    server_down.set()
    worker.join(120)
    assert not worker.is_alive(), "run_job hung on the dead server"
    assert result["outcome"] != {"job_id": record.id, "status": "completed"}, result
    proxy.restore()

    # Back up: the record never says completed. A runner that could not even record the failure
    # leaves a silent in_progress job, which the reaper re-enqueues (or fails when out of attempts).
    time.sleep(1.5)  # past the lease
    seen = runner.store.get(record.id)
    assert seen.status != "completed", seen
    if seen.status == "in_progress":
        assert runner.reap_once() == [record.id]
        assert requeued == [record.id]
        seen = runner.store.get(record.id)
        assert seen.status == "queued"
    else:
        assert seen.status == "failed" and seen.error.message, seen
    assert not seen.outputs or all(direct.exists(o.key) for o in seen.outputs)
    runner._stop.set()


def _run(runner: JobRunnerDeployment, job_id: str) -> dict | str:
    try:
        return runner.run_job(job_id)
    except Exception as exc:  # the failure could not be recorded either: the storage is down
        return f"raised {type(exc).__name__}"
