"""The derived asset index (storage/assets.py) kept in sync from the shared records: what a replica
sees of jobs made, finished, tagged and deleted by another, and a rebuild from nothing."""

from __future__ import annotations

import time

from storage.assets import AssetIndex, AssetMeta, AssetQuery, delete_job_assets, fts_query
from storage.fs import Storage
from storage.jobs import JobStore

ALL = AssetQuery(all_owners=True)


def ids(index: AssetIndex, query: AssetQuery = ALL) -> list[str]:
    index.refresh()
    return [row["record"]["id"] for row in index.search(query)]


def test_a_replica_sees_another_replicas_jobs_edits_and_deletes(tmp_path):
    storage = Storage(str(tmp_path / "storage"))
    store = JobStore(storage)
    # two replicas: own SQLite files; `mine` syncs fully only every hour (the quick sync still runs)
    mine = AssetIndex(storage, str(tmp_path / "a.sqlite"), sync_interval_s=3600)
    theirs = AssetIndex(storage, str(tmp_path / "b.sqlite"), sync_interval_s=0)
    done = store.create("images.generations", {"sdxl": {"prompt": "first light"}}, owner="alice")
    store.update(done.id, status="completed")
    assert ids(mine) == [done.id]  # the first search builds the index
    # a job made on another replica: seen while it runs (jobs/active/), and seen finishing at once
    running = store.create("images.generations", {"sdxl": {"prompt": "second light"}}, owner="alice")
    assert ids(mine) == [running.id, done.id]
    store.update(running.id, status="completed")
    assert ids(mine, AssetQuery(all_owners=True, status="completed")) == [running.id, done.id]
    # a job this replica made (JobsService tells it) is seen even when it finished before any search
    quick = store.create("images.upscale", {"upscale": {"image_key": "outputs/x.png"}}, owner="bob")
    store.update(quick.id, status="completed")
    assert quick.id not in ids(mine)
    mine.note(quick.id)
    assert ids(mine)[0] == quick.id
    store.delete(quick.id)
    # a tag and a delete on the other replica reach this one with its next full sync
    theirs.put_meta(done.id, AssetMeta(tags=["keeper"]))
    store.delete(running.id)
    assert ids(mine) == [quick.id, running.id, done.id]  # not yet: within sync_interval_s
    mine.sync()
    assert ids(mine) == [done.id] and ids(mine, AssetQuery(all_owners=True, tag="keeper")) == [done.id]
    # the index is derived: a new file rebuilds it from the records and the meta
    mine.close()
    rebuilt = AssetIndex(storage, str(tmp_path / "c.sqlite"), sync_interval_s=3600)
    assert ids(rebuilt, AssetQuery(all_owners=True, q="keep")) == [done.id]
    # and a reopened one only reads what is new
    reopened = AssetIndex(storage, str(tmp_path / "c.sqlite"), sync_interval_s=3600)
    assert reopened.sync()["read"] == 0


def test_text_queries_are_words_as_prefixes():
    assert fts_query('light "house" OR -x') == '"light"* AND "house"* AND "or"* AND "x"*'
    assert fts_query("  ¿? ") is None


def test_a_delete_drops_one_job_without_listing_every_job(tmp_path, monkeypatch):
    """A delete catches the index up on the recent job ids only; a job another replica made and
    finished since the last full sync still keeps the input it shares."""
    storage = Storage(str(tmp_path / "storage"))
    store = JobStore(storage)
    upload = storage.put_bytes("uploads/upload_0123456789ab01234567/image", b"img")
    old = store.create("images.edits", {"image_key": upload}, owner="alice")
    store.update(old.id, status="completed")
    index = AssetIndex(storage, str(tmp_path / "a.sqlite"), sync_interval_s=3600)
    assert ids(index) == [old.id]  # built
    replay = store.create("images.edits", {"image_key": upload}, owner="alice")  # on another replica
    store.update(replay.id, status="completed")

    def full_listing():
        raise AssertionError("a delete listed every job id")

    monkeypatch.setattr(index, "_listed_ids", full_listing)
    report = delete_job_assets(index, store.get(old.id))
    assert upload not in report.deleted and storage.exists(upload)  # the replay uses it
    assert ids(index) == [replay.id]  # the deleted job left the index, the replay came in
    assert delete_job_assets(index, store.get(replay.id)).deleted == [upload] and not storage.exists(upload)


def test_recent_job_ids_are_listed_by_time_prefix(tmp_path):
    storage = Storage(str(tmp_path / "storage"))
    store = JobStore(storage)
    made = {store.create("images.generations", {}).id for _ in range(3)}
    storage.put_json("jobs/job_000000000001aaaaaaaa.json", {})  # made in 1970
    index = AssetIndex(storage, str(tmp_path / "a.sqlite"), sync_interval_s=3600)
    assert index._recent_ids(time.time() - 60) == made
    assert index._recent_ids(0) == {*made, "job_000000000001aaaaaaaa"}
