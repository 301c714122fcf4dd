"""storage.jobs.JobStore on a local folder and on S3 (moto's server on loopback)."""

from __future__ import annotations

import pickle
import time

import pytest

from storage import Storage
from storage.jobs import (
    TERMINAL_STATUSES,
    JobError,
    JobNotFoundError,
    JobOutput,
    JobRecord,
    JobStore,
)
from storage.keys import job_cancel_key, job_key



@pytest.fixture()
def store(storage) -> JobStore:
    return JobStore(storage)


def test_create_get_round_trip(store):
    before = time.time()
    rec = store.create("image", {"prompt": "a cat", "n": 2}, stages=["generate", "upscale"])
    assert rec.id.startswith("job_")
    assert rec.status == "queued" and rec.progress == 0.0 and rec.attempts == 0
    assert rec.max_attempts == 2 and rec.stages == ["generate", "upscale"]
    assert before <= rec.created_at == rec.updated_at <= time.time()
    assert store.storage.exists(job_key(rec.id))  # persisted before return
    got = store.get(rec.id)
    assert got == rec
    assert got.request == {"prompt": "a cat", "n": 2}
    raw = store.storage.get_json(job_key(rec.id))
    assert raw["id"] == rec.id and raw["status"] == "queued"


@pytest.mark.parametrize(
    "job_id", ["job_000000000000deadbeef", "../x", "../../etc/passwd", "", "a/b", ".hidden", None]
)
def test_unknown_and_invalid_ids_are_not_found(store, job_id):
    with pytest.raises(JobNotFoundError) as info:
        store.get(job_id)
    assert isinstance(info.value, KeyError)
    assert "not found" in str(info.value)
    with pytest.raises(JobNotFoundError):
        store.update(job_id, progress=5.0)
    with pytest.raises(JobNotFoundError):
        store.request_cancel(job_id)
    with pytest.raises(JobNotFoundError):
        store.get_with_cancel(job_id)
    assert store.is_cancel_requested(job_id) is False


def test_update_and_save(store):
    rec = store.create("video", {"image": "x"}, stages=["svd"], max_attempts=3)
    time.sleep(0.002)
    upd = store.update(
        rec.id,
        status="in_progress",
        stage="svd",
        progress=40.0,
        stage_progress=40.0,
        step=10,
        total_steps=25,
        attempts=1,
        started_at=time.time(),
        heartbeat_at=time.time(),
        task_id="celery-123",
    )
    assert upd.updated_at > rec.updated_at
    got = store.get(rec.id)
    assert got.status == "in_progress" and got.step == 10 and got.task_id == "celery-123"
    assert got.max_attempts == 3

    got.status = "completed"
    got.progress = 100.0
    got.outputs = [JobOutput(key="outputs/2026/11/21/x/0.mp4", content_type="video/mp4", seed=7)]
    got.result = {"seeds": [7], "timings": {"svd": 1.5}}
    got.finished_at = time.time()
    store.save(got)
    final = store.get(rec.id)
    assert final.outputs[0].key.endswith("0.mp4") and final.outputs[0].seed == 7
    assert final.result["timings"]["svd"] == 1.5

    failed = store.update(rec.id, status="failed", error={"type": "oom", "message": "boom"})
    assert failed.error == JobError(type="oom", message="boom")
    assert store.get(rec.id).error.type == "oom"

    with pytest.raises(TypeError):
        store.update(rec.id, no_such_field=1)
    with pytest.raises(ValueError):
        store.update(rec.id, status="exploded")
    with pytest.raises(ValueError):
        store.update(rec.id, id="job_other")
    assert store.get(rec.id).status == "failed"  # rejected updates wrote nothing


def test_list_newest_first_with_filters(store):
    created = []
    for i in range(7):
        created.append(store.create("image" if i % 2 == 0 else "video", {"i": i}))
    ids = [r.id for r in created]
    store.update(ids[1], status="completed")
    store.update(ids[4], status="completed")
    # noise that must not be mistaken for records
    store.storage.put_bytes("jobs/README.txt", b"not a job")
    store.request_cancel(ids[6])  # also writes a .cancel marker

    newest_first = list(reversed(ids))
    assert [r.id for r in store.list()] == newest_first
    assert [r.id for r in store.list(limit=3)] == newest_first[:3]
    page2 = store.list(limit=3, after=newest_first[2])
    assert [r.id for r in page2] == newest_first[3:6]
    assert [r.id for r in store.list(limit=3, after=page2[-1].id)] == newest_first[6:]
    assert store.list(after=ids[0]) == []
    assert store.list(limit=0) == []

    assert [r.id for r in store.list(status="completed")] == [ids[4], ids[1]]
    assert [r.id for r in store.list(status="queued", kind="image")] == [ids[2], ids[0]]
    assert [r.id for r in store.list(status="cancelled")] == [ids[6]]
    assert [r.id for r in store.list(kind="video", limit=2)] == [ids[5], ids[3]]
    assert [r.id for r in store.list(kind="video", after=ids[3])] == [ids[1]]
    with pytest.raises(ValueError):
        store.list(status="bogus")
    with pytest.raises(ValueError):
        store.list(limit=-1)


def test_list_reads_only_what_it_returns(store, monkeypatch):
    ids = [store.create("image", {}).id for _ in range(6)]
    reads: list[str] = []
    real_get = store.get

    def counting_get(job_id):
        reads.append(job_id)
        return real_get(job_id)

    monkeypatch.setattr(store, "get", counting_get)
    out = store.list(limit=2)
    assert [r.id for r in out] == [ids[5], ids[4]]
    assert reads == [ids[5], ids[4]]


def test_cancel_queued_job(store):
    rec = store.create("image", {})
    out = store.request_cancel(rec.id)
    assert out.status == "cancelled" and out.cancel_requested is True
    assert out.finished_at is not None
    assert store.is_cancel_requested(rec.id)
    assert store.storage.exists(job_cancel_key(rec.id))
    got = store.get(rec.id)
    assert got.status == "cancelled" and got.cancel_requested


def test_cancel_in_progress_survives_worker_save(store):
    rec = store.create("video", {}, stages=["svd", "upscale"])
    # the worker picks the job up and keeps its own copy of the record
    worker_copy = store.update(rec.id, status="in_progress", stage="svd", attempts=1)
    assert not store.is_cancel_requested(rec.id)

    out = store.request_cancel(rec.id)
    assert out.status == "in_progress" and out.cancel_requested is True
    assert store.get(rec.id).status == "in_progress"  # the ingress did not rewrite the record

    # the worker writes its (stale) record: progress, cancel_requested still False
    worker_copy.progress = 50.0
    worker_copy.stage_progress = 100.0
    store.save(worker_copy)
    assert store.get(rec.id).cancel_requested is False  # the record alone would miss it...
    assert store.is_cancel_requested(rec.id)  # ...but the marker is intact
    seen = store.get_with_cancel(rec.id)
    assert seen.cancel_requested is True and seen.progress == 50.0

    # the worker notices and finishes the job as cancelled
    store.update(rec.id, status="cancelled", finished_at=time.time())
    assert store.get_with_cancel(rec.id).status == "cancelled"


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_cancel_terminal_job_is_unchanged(store, status):
    rec = store.create("image", {})
    done = store.update(rec.id, status=status, progress=100.0)
    out = store.request_cancel(rec.id)
    assert out == done
    assert out.cancel_requested is False
    assert not store.is_cancel_requested(rec.id)
    assert store.get(rec.id) == done


def test_get_with_cancel_without_marker(store):
    rec = store.create("image", {})
    assert store.get_with_cancel(rec.id).cancel_requested is False


def test_delete(store):
    rec = store.create("image", {})
    store.request_cancel(rec.id)
    store.delete(rec.id)
    with pytest.raises(JobNotFoundError):
        store.get(rec.id)
    assert not store.is_cancel_requested(rec.id)
    store.delete(rec.id)  # missing is fine


def test_store_pickles(store):
    rec = store.create("image", {"p": 1})
    clone = pickle.loads(pickle.dumps(store))
    assert clone.get(rec.id) == rec


def test_record_defaults_and_unknown_fields():
    r = JobRecord.model_validate(
        {"id": "job_x", "kind": "image", "created_at": 1.0, "updated_at": 1.0, "future_field": 1}
    )
    assert r.status == "queued" and r.outputs == [] and r.request == {} and r.error is None
    assert r.stages == [] and r.result is None and r.cancel_requested is False
    assert not r.is_terminal


def test_active_index_tracks_unfinished_jobs(store):
    a = store.create("k", {})
    b = store.create("k", {})
    c = store.create("k", {})
    assert store.active_ids() == [a.id, b.id, c.id] and store.count_active() == 3
    store.update(a.id, status="in_progress")
    store.update(b.id, status="completed")
    store.request_cancel(c.id)  # queued -> cancelled at once
    assert store.active_ids() == [a.id]
    assert [r.id for r in store.list_active()] == [a.id]
    store.delete(a.id)
    assert store.count_active() == 0 and store.list_active() == []
