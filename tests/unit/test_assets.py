"""Issue 22, item 2: the asset library over HTTP (the app as the ingress builds it, fake queue, no
Ray): search by each field from the index, tags and favourites, statistics by kind, deleting a job
with its files (a shared input stays), retention dry-run and apply, and each route's bad inputs.
Every route answers for the caller's tenant only: alice and bob are tenants, root is admin."""

from __future__ import annotations

import time

import pytest

from api.auth import PermissionDeniedError
from graphs.job_runner import JobRunnerDeployment
from storage.assets import AssetIndex, AssetQuery, Retention, RetentionConfig
from storage.jobs import JobOutput, JobStore
from storage.keys import output_key
from tests.keyed_app import keyed_app, png

KEYS = {"alice": ("alice-key", ["generate", "train"]), "bob": ("bob-key", ["generate", "train"]),
        "root": ("root-key", ["admin"]), "viewer": ("viewer-key", ["read"])}
DAY = 86400.0


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture()
def app(tmp_path):
    built = keyed_app(tmp_path / "storage", KEYS, {"assets": {"index_dir": str(tmp_path / "index"),
                                                              "sync_interval_s": 0}})
    built.store = built.services.jobs.jobs
    built.storage = built.services.files.storage
    return built


def make_job(app, owner: str, prompt: str, *, kind: str = "images.generations", lora: str | None = None,
             model: str = "sdxl", age_days: float = 0.0, status: str = "completed", inputs: dict | None = None,
             outputs: int = 1) -> tuple[str, list[str]]:
    """A finished job of `owner` as the pipelines leave it: its request, result and output files."""
    request = {"sdxl": {"prompt": prompt, "width": 64, "height": 64, **({"lora": lora} if lora else {})},
               **(inputs or {})}
    record = app.store.create(kind, request, owner=owner)
    keys = [app.storage.put_bytes(output_key(record.id, i), png(seed=i)) for i in range(outputs)]
    created = time.time() - age_days * DAY
    result = {"model": model, "prompt": prompt,
              "lora": {"name": lora.split(":")[0], "version": int(lora.split(":")[1]), "sha256": "0" * 64}
              if lora else None}
    app.store.update(record.id, status=status, created_at=created, finished_at=created, result=result,
                     outputs=[JobOutput(key=k, content_type="image/png", width=64, height=64) for k in keys])
    return record.id, keys


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["data"]]


def error_param(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["param"]


def test_search_by_each_field(app):
    client = app.client
    lighthouse, _ = make_job(app, "alice", "a red lighthouse at dusk", lora="ink-style:2", age_days=3)
    forest, _ = make_job(app, "alice", "a misty forest", model="sdxl-turbo")
    upscaled, _ = make_job(app, "alice", "a lighthouse, sharper", kind="images.upscale")
    failed, _ = make_job(app, "alice", "a broken lighthouse", status="failed", outputs=0)
    bobs, _ = make_job(app, "bob", "a red lighthouse by bob")
    client.put(f"/v1/jobs/{forest}/asset", headers=bearer("alice"), json={"tags": ["Nature", "mist"]})
    client.put(f"/v1/jobs/{upscaled}/asset", headers=bearer("alice"), json={"favorite": True})

    def search(who: str = "alice", **params):
        return ids(client.get("/v1/assets", headers=bearer(who), params=params))

    newest_first = [failed, upscaled, forest, lighthouse]
    assert search() == newest_first  # alice's own, never bob's
    assert search(q="lighthouse") == [failed, upscaled, lighthouse]
    assert search(q="lightho RED") == [lighthouse]  # every word, each a prefix
    assert search(q="nature") == [forest]  # tags are searched as text too
    assert search(kind="images.upscale") == [upscaled]
    assert search(model="sdxl-turbo") == [forest]
    assert search(lora="ink-style") == [lighthouse]
    assert search(lora="ink-style:2") == [lighthouse]
    assert search(lora="ink-style:1") == []
    assert search(tag="mist") == [forest]
    assert search(tag="NATURE") == [forest]  # tags are stored lower-cased
    assert search(favorite="true") == [upscaled]
    assert search(status="failed") == [failed]
    two_days_ago = time.time() - 2 * DAY
    assert search(created_before=two_days_ago) == [lighthouse]
    assert lighthouse not in search(created_after=two_days_ago)
    assert search(created_after=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(two_days_ago)),
                  q="lighthouse") == [failed, upscaled]
    # pages: `after` is the last id of the previous page
    page = client.get("/v1/assets", headers=bearer("alice"), params={"limit": 2}).json()
    assert [a["id"] for a in page["data"]] == newest_first[:2] and page["has_more"]
    assert search(limit=2, after=page["last_id"]) == newest_first[2:]
    # an asset is a job view with its tags, favourite and files
    item = client.get("/v1/assets", headers=bearer("alice"), params={"tag": "mist"}).json()["data"][0]
    assert item["tags"] == ["nature", "mist"] and item["favorite"] is False and item["bytes"] > 0
    assert item["params"]["sdxl"]["prompt"] == "a misty forest" and item["outputs"][0]["url"]
    # tenants: bob sees his own, root all, a read-only key searches its own tenant (nothing)
    assert search("bob", q="lighthouse") == [bobs]
    assert search("root", q="red") == [bobs, lighthouse]
    assert search("viewer") == []


def test_search_bad_inputs_name_the_field(app):
    client = app.client
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"created_after": "yesterday"},
                          "created_after"), ({"status": "done"}, "status"), ({"favorite": "maybe"}, "favorite"),
                          ({"tag": "no!"}, "tag"), ({"q": "x" * 201}, "q"),
                          ({"created_after": 2000, "created_before": 1000}, "created_before")):
        assert error_param(client.get("/v1/assets", headers=bearer("alice"), params=params)) == param, params


def test_tags_and_favourites(app, tmp_path):
    client = app.client
    job, _ = make_job(app, "alice", "a quiet harbour")
    url = f"/v1/jobs/{job}/asset"
    assert client.get(url, headers=bearer("alice")).json()["tags"] == []
    set_ = client.put(url, headers=bearer("alice"), json={"tags": ["sea", " Boats  at night "], "favorite": True})
    assert set_.status_code == 200, set_.text
    assert set_.json()["tags"] == ["sea", "boats at night"] and set_.json()["favorite"] is True
    edit = client.put(url, headers=bearer("alice"), json={"add_tags": ["print"], "remove_tags": ["sea"]})
    assert edit.json()["tags"] == ["boats at night", "print"] and edit.json()["favorite"] is True
    assert client.get(url, headers=bearer("alice")).json()["tags"] == ["boats at night", "print"]
    tags = client.get("/v1/assets/tags", headers=bearer("alice")).json()["data"]
    assert {t["tag"]: t["count"] for t in tags} == {"boats at night": 1, "print": 1}
    assert client.get("/v1/assets/tags", headers=bearer("bob")).json()["data"] == []
    # another replica's index (another process, its own SQLite file) sees the edit from storage
    other = AssetIndex(app.storage, str(tmp_path / "other.sqlite"))
    other.sync()
    [row] = other.search(AssetQuery(tag="print", all_owners=True))
    assert row["record"]["id"] == job and row["favorite"]
    client.put(url, headers=bearer("alice"), json={"favorite": False, "tags": []})
    other.sync()
    assert other.search(AssetQuery(tag="print", all_owners=True)) == []
    assert other.search(AssetQuery(favorite=False, all_owners=True))[0]["record"]["id"] == job
    # bad inputs name the field; another tenant's job is unknown
    assert error_param(client.put(url, headers=bearer("alice"), json={"tags": ["ok", "not ok!"]})) == "tags.1"
    assert error_param(client.put(url, headers=bearer("alice"), json={"add_tags": [""]})) == "add_tags.0"
    assert error_param(client.put(url, headers=bearer("alice"), json={"tags": [f"t{i}" for i in range(21)]})) == "tags"
    assert error_param(client.put(url, headers=bearer("alice"), json={"favorite": "very"})) == "favorite"
    assert error_param(client.put(url, headers=bearer("alice"), json={"colour": "red"})) == "colour"
    assert error_param(client.put(url, headers=bearer("bob"), json={"favorite": True}), 404) == "job_id"
    assert error_param(client.get(url, headers=bearer("bob")), 404) == "job_id"
    assert client.put(url, headers=bearer("viewer"), json={"favorite": True}).status_code == 403


def test_favourites_and_tags_of_one_output(app):
    """An n=2 job: one output favourited and tagged alone; search, stats and retention see the job."""
    client = app.client
    pair, keys = make_job(app, "alice", "two boats", outputs=2, age_days=40)
    single, _ = make_job(app, "alice", "one boat", age_days=40)
    url = f"/v1/jobs/{pair}/asset"
    edited = client.put(url, headers=bearer("alice"), json={"output": 1, "favorite": True, "add_tags": ["Pick"]})
    assert edited.status_code == 200, edited.text
    view = client.get(url, headers=bearer("alice")).json()
    assert [(o["key"], o["favorite"], o["tags"]) for o in view["outputs"]] == [(keys[0], False, []),
                                                                                (keys[1], True, ["pick"])]
    assert view["favorite"] is False and view["tags"] == []  # the job's own marks are untouched

    def search(**params):
        return client.get("/v1/assets", headers=bearer("alice"), params=params).json()["data"]

    [found] = search(favorite="true")  # a job with any favourite output
    assert found["id"] == pair and [o["favorite"] for o in found["outputs"]] == [False, True]
    assert [a["id"] for a in search(favorite="false")] == [single]
    assert [a["id"] for a in search(tag="pick")] == [pair] and [a["id"] for a in search(q="pick")] == [pair]
    assert client.get("/v1/assets/stats", headers=bearer("alice")).json()["total"]["favorites"] == 1
    # the per-job form still works: a favourite job is every output a favourite ...
    client.put(url, headers=bearer("alice"), json={"favorite": True})
    assert [o["favorite"] for o in client.get(url, headers=bearer("alice")).json()["outputs"]] == [True, True]
    # ... and un-favouriting one output of it leaves the other a favourite
    view = client.put(url, headers=bearer("alice"), json={"output": 1, "favorite": False}).json()
    assert view["favorite"] is False and [o["favorite"] for o in view["outputs"]] == [True, False]
    assert view["outputs"][1]["tags"] == ["pick"]
    # retention keeps a job with a favourite output, planning from the index and re-reading its meta
    policy = RetentionConfig.model_validate({"dry_run": False, "kinds": {"images.generations": {"max_age_days": 30}}})
    retention = Retention(app.services.assets.index, policy)
    assert [j["id"] for j in retention.run(dry_run=True).jobs] == [single]
    assert retention._still_due(pair, time.time()) is None and retention._still_due(single, time.time())
    # bad inputs name the field
    assert error_param(client.put(url, headers=bearer("alice"), json={"output": 2, "favorite": True})) == "output"
    assert error_param(client.put(url, headers=bearer("alice"), json={"output": -1, "favorite": True})) == "output"


def test_the_job_listing_answers_from_the_index(app, monkeypatch, tmp_path):
    """GET /v1/jobs: the same pages (filters, `after`, tenants) from the index as from the records,
    and the records while the index is not built or fails."""
    client, jobs = app.client, app.services.jobs
    made = [make_job(app, "alice", f"a{i}", kind="images.upscale" if i % 3 == 0 else "images.generations",
                     status="failed" if i % 4 == 0 else "completed")[0] for i in range(7)]
    make_job(app, "bob", "bob's")
    app.store.create("images.generations", {"sdxl": {"prompt": "queued"}}, owner="alice")
    cases = [("alice", {}), ("alice", {"limit": 2}), ("alice", {"limit": 2, "after": made[4]}),
             ("alice", {"status": "failed"}), ("alice", {"kind": "images.upscale", "limit": 1}),
             ("alice", {"status": "queued"}), ("bob", {}), ("root", {"limit": 4}), ("viewer", {})]

    def pages() -> list[dict]:
        out = []
        for who, params in cases:
            response = client.get("/v1/jobs", headers=bearer(who), params=params)
            assert response.status_code == 200, response.text
            out.append(response.json())
        return out

    index, jobs.index = jobs.index, None
    from_records = pages()
    assert [j["id"] for j in from_records[1]["data"]] != [] and from_records[1]["has_more"]
    jobs.index = index
    listed = []
    real_list = JobStore.list
    monkeypatch.setattr(JobStore, "list", lambda *a, **k: listed.append(1) or real_list(*a, **k))
    assert pages() == from_records and not listed  # every page from the index
    # a replica's first listing does not wait for the build: the records answer until it is done
    fresh = AssetIndex(app.storage, str(tmp_path / "fresh.sqlite"), sync_interval_s=3600)
    jobs.index = fresh
    assert pages() == from_records and listed
    deadline = time.monotonic() + 30
    while not fresh._last_sync and time.monotonic() < deadline:
        time.sleep(0.05)
    listed.clear()
    assert pages() == from_records and not listed
    # a broken local index: the records answer
    fresh.close()
    assert pages() == from_records and listed


def test_delete_keeps_a_shared_input_while_anything_uses_it(app):
    client, storage = app.client, app.storage
    upload = storage.put_bytes("uploads/upload_0123456789ab01234567/image", png(seed=7))
    first, first_outputs = make_job(app, "alice", "an edit", kind="images.edits", inputs={"image_key": upload})
    replay, replay_outputs = make_job(app, "alice", "an edit", kind="images.edits", inputs={"image_key": upload})
    # an upscale of the first job's output: that output is now a shared input
    upscale, _ = make_job(app, "alice", "", kind="images.upscale", inputs={"upscale": {"image_key": first_outputs[0]}})
    client.put(f"/v1/jobs/{first}/asset", headers=bearer("alice"), json={"tags": ["keep"]})
    assert storage.list(f"assets/meta/{first}.")

    assert error_param(client.delete(f"/v1/jobs/{first}", headers=bearer("bob")), 404) == "job_id"
    deleted = client.delete(f"/v1/jobs/{first}", headers=bearer("alice"))
    assert deleted.status_code == 200, deleted.text
    body = deleted.json()
    assert body["deleted"] and body["files_kept"] == [first_outputs[0]]  # the upscale uses it
    assert upload not in body["files_deleted"]  # the replay uses it
    assert storage.exists(first_outputs[0]) and storage.exists(upload)
    assert error_param(client.get(f"/v1/jobs/{first}", headers=bearer("alice")), 404) == "job_id"
    assert not storage.list(f"assets/meta/{first}.")
    assert first not in ids(client.get("/v1/assets", headers=bearer("alice")))
    # the last user of each shared file takes it with it
    assert client.delete(f"/v1/jobs/{replay}", headers=bearer("alice")).json()["files_deleted"] == [
        *replay_outputs, upload]
    assert not storage.exists(upload) and not storage.exists(replay_outputs[0])
    gone = client.delete(f"/v1/jobs/{upscale}", headers=bearer("alice")).json()["files_deleted"]
    assert first_outputs[0] in gone and not storage.exists(first_outputs[0])
    assert ids(client.get("/v1/assets", headers=bearer("alice"))) == []
    assert error_param(client.delete(f"/v1/jobs/{upscale}", headers=bearer("alice")), 404) == "job_id"


def test_a_running_job_is_not_deleted(app):
    running = app.store.create("images.generations", {"sdxl": {"prompt": "busy"}}, owner="alice")
    app.store.update(running.id, status="in_progress")
    assert error_param(app.client.delete(f"/v1/jobs/{running.id}", headers=bearer("alice")), 409) == "job_id"
    assert app.store.get(running.id).status == "in_progress"
    # a dataset import needs the `train` scope to delete, as to cancel
    imported = app.store.create("datasets.import", {"dataset_id": "d"}, owner="alice")
    app.store.update(imported.id, status="completed")
    with pytest.raises(PermissionDeniedError) as refused:
        app.services.assets.delete(imported.id, frozenset({"generate"}))
    assert refused.value.param == "job_id"
    assert app.services.assets.delete(imported.id, frozenset({"train"})).deleted


def test_stats_by_kind(app):
    client = app.client
    a, _ = make_job(app, "alice", "one", outputs=2)
    make_job(app, "alice", "two")
    make_job(app, "alice", "three", kind="images.upscale")
    make_job(app, "bob", "bob's")
    client.put(f"/v1/jobs/{a}/asset", headers=bearer("alice"), json={"favorite": True})
    stats = client.get("/v1/assets/stats", headers=bearer("alice")).json()
    size = len(png(seed=0))
    assert stats["by_kind"]["images.generations"] == {"jobs": 2, "outputs": 3, "bytes": 2 * size + len(png(seed=1)),
                                                      "favorites": 1}
    assert stats["by_kind"]["images.upscale"]["jobs"] == 1
    assert stats["total"]["jobs"] == 3 and stats["total"]["outputs"] == 4
    assert client.get("/v1/assets/stats", headers=bearer("bob")).json()["total"]["jobs"] == 1
    assert client.get("/v1/assets/stats", headers=bearer("root")).json()["total"]["jobs"] == 4


def test_retention_dry_run_then_apply(app):
    client, storage = app.client, app.storage
    app.services.assets.config.retention.kinds.clear()
    assert error_param(client.post("/v1/assets/retention", headers=bearer("root"), json={"dry_run": True})) == "dry_run"
    policy = RetentionConfig.model_validate({"kinds": {"images.generations": {"max_age_days": 30},
                                                       "*": {"max_age_days": 90, "statuses": ["failed"]}}})
    app.services.assets.config.retention.kinds.update(policy.kinds)
    old, old_files = make_job(app, "alice", "old", age_days=40)
    old_fav, fav_files = make_job(app, "alice", "old favourite", age_days=40)
    recent, _ = make_job(app, "alice", "recent", age_days=5)
    old_upscale, _ = make_job(app, "bob", "old upscale", kind="images.upscale", age_days=40)  # '*': failed only
    old_failed, _ = make_job(app, "bob", "old failure", kind="images.upscale", age_days=100, status="failed",
                            outputs=0)
    client.put(f"/v1/jobs/{old_fav}/asset", headers=bearer("alice"), json={"favorite": True})

    assert client.post("/v1/assets/retention", headers=bearer("alice"), json={}).status_code == 403
    assert client.get("/v1/assets/retention", headers=bearer("alice")).status_code == 403
    assert error_param(client.post("/v1/assets/retention", headers=bearer("root"), json={"dry_run": "x"})) == "dry_run"
    dry = client.post("/v1/assets/retention", headers=bearer("root"), json={"dry_run": True})
    assert dry.status_code == 200, dry.text
    assert dry.json()["dry_run"] is True and [j["id"] for j in dry.json()["jobs"]] == [old, old_failed]
    assert dry.json()["bytes"] == len(png(seed=0))
    assert storage.exists(old_files[0]) and app.store.get(old).status == "completed"  # nothing went
    assert client.get("/v1/assets/retention", headers=bearer("root")).json()["last_run"]["jobs"][0]["id"] == old

    applied = client.post("/v1/assets/retention", headers=bearer("root"), json={"dry_run": False}).json()
    assert applied["dry_run"] is False and [j["id"] for j in applied["jobs"]] == [old, old_failed]
    assert applied["jobs"][0]["deleted"] == old_files
    assert not storage.exists(old_files[0])
    left = ids(client.get("/v1/assets", headers=bearer("root")))
    assert sorted(left) == sorted([old_fav, recent, old_upscale])
    assert storage.exists(fav_files[0])
    again = client.post("/v1/assets/retention", headers=bearer("root"), json={"dry_run": True}).json()
    assert again["jobs"] == []


def test_the_job_runner_sweeps_once_per_period(tmp_path, monkeypatch):
    """The sweeper rides the reaper: one runner (of all) takes each period's lease; dry-run reports only."""
    monkeypatch.setattr("celery.current_task", None)
    queue = {"broker_url": "memory://", "backend_url": "cache+memory://", "reap_interval_s": 3600}
    retention = {"enabled": True, "dry_run": True, "kinds": {"images.generations": {"max_age_days": 1}}}
    runners = [JobRunnerDeployment(queue, storage_root=str(tmp_path / "storage"), retention=retention,
                                   assets_index_dir=str(tmp_path / f"index{i}")) for i in range(2)]
    try:
        store = runners[0].store
        job = store.create("images.generations", {"sdxl": {"prompt": "old"}})
        store.update(job.id, status="completed", created_at=time.time() - 2 * DAY)
        first = runners[0].sweep_assets()
        assert first is not None and first.dry_run and [j["id"] for j in first.jobs] == [job.id]
        assert runners[1].sweep_assets() is None  # the period's lease is taken
        assert store.get(job.id).status == "completed"  # a dry run deletes nothing
        apply = Retention(AssetIndex(store.storage, str(tmp_path / "apply.sqlite")),
                          RetentionConfig.model_validate({**retention, "dry_run": False}))
        assert [j["id"] for j in apply.run().jobs] == [job.id]
        assert store.list_ids() == []
    finally:
        for runner in runners:
            runner._stop.set()
