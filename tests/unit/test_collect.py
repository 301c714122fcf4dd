"""Issue 20: collect from Unsplash and Pexels, import with attribution, and curate datasets.

Everything runs against a loopback stand-in of both APIs (tests/source_standin.py); nothing
reaches the internet and no real key is used. The app is built as the ingress builds it
(tests/keyed_app.py) with two tenants, alice and bob; a collect job is recorded through the API
and then run here with the job runner's own JobContext.
"""

from __future__ import annotations

import csv
import io
import json
import time

import pytest

from deployments.errors import JobCancelledError
from graphs.dataset_jobs import dataset_collect
from graphs.job_runner import JobContext
from storage.datasets import MAX_CAPTION_LENGTH
from storage.sources import (
    CollectConfig,
    PexelsSource,
    SourceError,
    SourceRateLimitedError,
    UnsplashSource,
    ping_download,
)
from tests.keyed_app import keyed_app
from tests.source_standin import PEXELS_KEY, UNSPLASH_KEY, StandIn

KEYS = {"alice": ("alice-key", ["generate", "train"]), "bob": ("bob-key", ["generate", "train"]),
        "reader": ("reader-key", ["read"])}


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture(scope="module")
def standin():
    with StandIn() as server:
        yield server


@pytest.fixture()
def keys(monkeypatch):
    monkeypatch.setenv("TEST_UNSPLASH_KEY", UNSPLASH_KEY)
    monkeypatch.setenv("TEST_PEXELS_KEY", PEXELS_KEY)


@pytest.fixture()
def app(tmp_path, standin, keys):
    return keyed_app(tmp_path / "storage", KEYS, standin.ingress())


def config(standin) -> CollectConfig:
    return CollectConfig.model_validate(standin.ingress()["collect"])


def dataset(client, who: str = "alice", name: str = "beaches") -> str:
    made = client.post("/v1/datasets", headers=bearer(who), json={"name": name, "license": "mixed"})
    assert made.status_code == 201, made.text
    return made.json()["id"]


def run_job(app, job_id: str, on_step=None) -> dict:
    """Runs the job here; ``on_step(done, total)`` sees each progress step after it is recorded."""
    store = app.services.jobs.jobs
    ctx = JobContext(store, store.get(job_id))
    if on_step is not None:
        step = ctx.step
        ctx.step = lambda done, total: (step(done, total), on_step(done, total))
    dataset_collect(ctx, {})
    return ctx.record.result


def submit(app, dataset_id: str, ids: list[str], who: str = "alice", tags: list[str] | None = None) -> str:
    accepted = app.client.post(f"/v1/datasets/{dataset_id}/collect", headers=bearer(who),
                               json={"result_ids": ids, "tags": tags or []})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["id"] in app.queue.sent
    return accepted.json()["id"]


def collect(app, dataset_id: str, ids: list[str], who: str = "alice", tags: list[str] | None = None,
            on_step=None) -> dict:
    return run_job(app, submit(app, dataset_id, ids, who, tags), on_step)


# --- connectors ------------------------------------------------------------------------------


def test_results_are_normalised_with_attribution_and_rate_limits(standin, keys):
    unsplash = UnsplashSource(config(standin).unsplash).search("beach", page=1, per_page=3, orientation="square",
                                                               color="blue")
    assert standin.searches[-1] == ("/search/photos", {"query": "beach", "page": "1", "per_page": "3",
                                                       "orientation": "squarish", "color": "blue"})
    assert (unsplash.total, unsplash.total_pages, len(unsplash.results)) == (6, 2, 3)
    assert (unsplash.rate_limit.limit, unsplash.rate_limit.remaining) == (50, 49)
    first = unsplash.results[0]
    assert (first.id, first.source, first.source_id, first.width, first.height) == ("unsplash:u1", "unsplash", "u1",
                                                                                    24, 16)
    assert first.thumbnail_url == first.full_url == first.download_url == f"{standin.url}/img/u1.png"
    assert first.description == "photo u1 on a beach" and first.photographer == "Ann Example"
    # Unsplash's guidelines: attribution links carry utm parameters
    assert first.photographer_url == "https://unsplash.com/@ann?utm_source=atelier&utm_medium=referral"
    assert first.page_url == "https://unsplash.com/photos/u1?utm_source=atelier&utm_medium=referral"
    assert (first.license, first.license_url) == ("Unsplash License", "https://unsplash.com/license")
    assert first.download_location == f"{standin.url}/photos/u1/download"

    pexels = PexelsSource(config(standin).pexels).search("beach", page=2, per_page=2, orientation="square")
    assert standin.searches[-1][1]["orientation"] == "square"
    assert (pexels.total, pexels.total_pages, [r.id for r in pexels.results]) == (5, 3, ["pexels:1", "pexels:2"])
    assert pexels.rate_limit.remaining == 19999 and pexels.rate_limit.reset_at == standin.reset_at
    photo = pexels.results[0]
    assert (photo.photographer, photo.photographer_url, photo.page_url) == (
        "Bo Example", "https://www.pexels.com/@bo", "https://www.pexels.com/photo/beach-1/")
    assert photo.description == "pexels beach 1" and photo.license == "Pexels License"
    assert photo.thumbnail_url.endswith("/img/p1.png") and photo.download_location is None


def test_a_bad_key_and_a_rate_limit_are_clear_errors(standin, monkeypatch):
    monkeypatch.setenv("TEST_UNSPLASH_KEY", "wrong")
    with pytest.raises(SourceError) as bad:
        UnsplashSource(config(standin).unsplash).search("beach")
    assert "refused the configured API key" in bad.value.message and "TEST_UNSPLASH_KEY" in bad.value.message
    monkeypatch.setenv("TEST_PEXELS_KEY", PEXELS_KEY)
    with pytest.raises(SourceRateLimitedError) as limited:
        PexelsSource(config(standin).pexels).search("ratelimited")
    assert limited.value.reset_at == standin.reset_at
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(standin.reset_at)) in limited.value.message


def test_a_spent_rate_limit_is_respected_until_its_reset(standin, keys):
    pexels = PexelsSource(config(standin).pexels)
    assert pexels.search("beach").rate_limit.remaining == 19999 and pexels.rate.exhausted() is None
    with pytest.raises(SourceRateLimitedError):
        pexels.search("ratelimited")
    asked = len(standin.searches)
    with pytest.raises(SourceRateLimitedError) as refused:  # the same error, without asking the source
        pexels.search("beach")
    assert len(standin.searches) == asked
    assert refused.value.reset_at == standin.reset_at and refused.value.status == 429
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(standin.reset_at)) in refused.value.message
    assert pexels.rate.exhausted(now=standin.reset_at + 1) is None  # asked again once the window resets


def test_sources_without_a_key_are_unavailable_with_the_reason(tmp_path, standin, monkeypatch):
    monkeypatch.delenv("TEST_UNSPLASH_KEY", raising=False)
    monkeypatch.setenv("TEST_PEXELS_KEY", PEXELS_KEY)
    app = keyed_app(tmp_path / "s", KEYS, standin.ingress())
    listed = app.client.get("/v1/collect/sources", headers=bearer("reader"))
    assert listed.status_code == 200, listed.text
    by_name = {s["name"]: s for s in listed.json()["data"]}
    assert by_name["unsplash"]["available"] is False and "TEST_UNSPLASH_KEY" in by_name["unsplash"]["reason"]
    assert by_name["pexels"]["available"] is True and by_name["pexels"]["reason"] is None
    assert by_name["pexels"]["max_per_page"] == 80 and "Pexels License" == by_name["pexels"]["license"]
    assert by_name["unsplash"]["license_summary"]
    assert UNSPLASH_KEY not in listed.text and PEXELS_KEY not in listed.text
    # asked for by name: a 400 naming it; left out: only the available source is searched
    asked = app.client.post("/v1/collect/search", headers=bearer("alice"),
                            json={"query": "beach", "sources": ["unsplash"]})
    assert asked.status_code == 400 and asked.json()["error"]["param"] == "sources.0", asked.text
    searched = app.client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach"})
    assert searched.status_code == 200 and set(searched.json()["sources"]) == {"pexels"}
    # a read-only key cannot search (it is a write of the collect area)
    assert app.client.post("/v1/collect/search", headers=bearer("reader"),
                           json={"query": "beach"}).status_code == 403


# --- the API ---------------------------------------------------------------------------------


def test_search_through_the_api(app, standin):
    found = app.client.post("/v1/collect/search", headers=bearer("alice"),
                            json={"query": "  beach ", "per_page": 2, "colour": "blue",
                                  "sources": ["unsplash", "pexels"]})
    assert found.status_code == 200, found.text
    body = found.json()
    assert body["query"] == "beach"
    assert [r["id"] for r in body["data"]] == ["unsplash:u1", "unsplash:u2", "pexels:1", "pexels:2"]
    assert body["sources"]["unsplash"]["rate_limit"]["remaining"] == 49
    assert body["sources"]["pexels"] == {"total": 5, "total_pages": 3, "results": 2,
                                         "rate_limit": {"limit": 20000, "remaining": 19999,
                                                        "reset_at": float(standin.reset_at)}}
    assert body["errors"] == []
    # the rate-limit state as headers too, per source (Unsplash says no reset time)
    assert found.headers["X-RateLimit-Unsplash-Limit"] == "50"
    assert found.headers["X-RateLimit-Unsplash-Remaining"] == "49" and "X-RateLimit-Unsplash-Reset" not in found.headers
    assert found.headers["X-RateLimit-Pexels-Remaining"] == "19999"
    assert found.headers["X-RateLimit-Pexels-Reset"] == str(standin.reset_at)


@pytest.mark.parametrize("body,param", [
    ({"query": "   "}, "query"),
    ({"query": "beach", "per_page": 31, "sources": ["unsplash"]}, "per_page"),
    ({"query": "beach", "per_page": 81}, "per_page"),
    ({"query": "beach", "sources": ["flickr"]}, "sources.0"),
    ({"query": "beach", "sources": []}, "sources"),
    ({"query": "beach", "orientation": "round"}, "orientation"),
    ({"query": "beach", "color": "turquoise", "sources": ["unsplash"]}, "color"),
    ({"query": "beach", "page": 0}, "page"),
])
def test_bad_search_input_is_a_400_naming_the_field(app, standin, body, param):
    before = len(standin.searches)
    refused = app.client.post("/v1/collect/search", headers=bearer("alice"), json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param, refused.text
    assert len(standin.searches) == before  # refused before any source was asked


def test_a_rate_limited_source_is_a_429_with_its_reset_time(app, standin):
    limited = app.client.post("/v1/collect/search", headers=bearer("alice"),
                              json={"query": "ratelimited", "sources": ["unsplash"]})
    assert limited.status_code == 429, limited.text
    error = limited.json()["error"]
    assert error["type"] == "source_rate_limited" and error["param"] == "sources"
    assert time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(standin.reset_at)) in error["message"]
    assert 0 < int(limited.headers["Retry-After"]) <= 1800
    assert limited.headers["X-RateLimit-Unsplash-Remaining"] == "0"
    assert limited.headers["X-RateLimit-Unsplash-Reset"] == str(standin.reset_at)
    # until the reset, Unsplash is not asked again: the same 429, whatever the query
    asked = len(standin.searches)
    again = app.client.post("/v1/collect/search", headers=bearer("alice"),
                            json={"query": "beach", "sources": ["unsplash"]})
    assert again.status_code == 429 and again.json()["error"] == error, again.text
    assert 0 < int(again.headers["Retry-After"]) <= 1800 and len(standin.searches) == asked
    # with two sources, both limited: the same 429 (only Pexels was asked)
    assert app.client.post("/v1/collect/search", headers=bearer("alice"),
                           json={"query": "ratelimited"}).status_code == 429
    assert [path for path, _ in standin.searches[asked:]] == ["/v1/search"]


def test_a_refused_key_is_a_502_naming_the_variable(app, monkeypatch):
    monkeypatch.setenv("TEST_PEXELS_KEY", "wrong")
    failed = app.client.post("/v1/collect/search", headers=bearer("alice"),
                             json={"query": "beach", "sources": ["pexels"]})
    assert failed.status_code == 502 and "TEST_PEXELS_KEY" in failed.json()["error"]["message"], failed.text
    # the other source still answers, and the failure is listed beside its results
    mixed = app.client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach"})
    assert mixed.status_code == 200, mixed.text
    assert [e["source"] for e in mixed.json()["errors"]] == ["pexels"] and mixed.json()["data"]


def test_imports_take_only_results_this_server_returned_to_the_caller(app):
    client = app.client
    mine = dataset(client)
    unseen = client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                         json={"result_ids": ["unsplash:u1"]})
    assert unseen.status_code == 400 and unseen.json()["error"]["param"] == "result_ids.0", unseen.text
    assert client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                       json={"result_ids": []}).json()["error"]["param"] == "result_ids"
    # bob's search does not make them importable by alice, nor alice's by bob
    assert client.post("/v1/collect/search", headers=bearer("bob"), json={"query": "beach"}).status_code == 200
    assert client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                       json={"result_ids": ["unsplash:u1"]}).status_code == 400
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach"})
    bobs = dataset(client, "bob", "bob-beaches")
    assert client.post(f"/v1/datasets/{bobs}/collect", headers=bearer("alice"),
                       json={"result_ids": ["unsplash:u1"]}).status_code == 404  # his dataset: unknown to her
    assert client.post(f"/v1/datasets/{mine}/collect", headers=bearer("bob"),
                       json={"result_ids": ["unsplash:u1"]}).status_code == 404
    # a made-up id after a search is still unseen
    made_up = client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                          json={"result_ids": ["unsplash:u1", "unsplash:nope"]})
    assert made_up.status_code == 400 and made_up.json()["error"]["param"] == "result_ids.1"
    assert client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                       json={"result_ids": ["unsplash:u1"], "tags": [" "]}).json()["error"]["param"] == "tags"
    assert not app.queue.sent  # nothing was queued by any refusal


# --- the collect job -------------------------------------------------------------------------


def test_collect_job_downloads_dedupes_attributes_and_pings(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach", "per_page": 10})
    pings = len(standin.pings)
    result = collect(app, mine, ["unsplash:u1", "unsplash:u2", "unsplash:u3", "pexels:1", "pexels:2",
                                 "unsplash:evil"], tags=["beach"])
    # u3 and pexels 2 serve u1's bytes: of the three, the first fetched lands and the others are
    # duplicates by hash; evil is on a host not allow-listed
    assert (result["version"], result["added"], result["images"]) == (1, 3, 3), result
    same = {"unsplash:u1", "unsplash:u3", "pexels:2"}
    assert len(result["duplicate_names"]) == 2 and set(result["duplicate_names"]) < same
    (kept,) = same - set(result["duplicate_names"])
    assert [r["filename"] for r in result["rejections"]] == ["unsplash:evil"]
    assert "download hosts" in result["rejections"][0]["reason"]
    assert "evil" not in standin.image_gets  # refused before any fetch
    # the download ping: once for each Unsplash photo that landed, never for a duplicate
    landed = sorted(n.split(":")[1] for n in {"unsplash:u2", kept} if n.startswith("unsplash:"))
    assert sorted(standin.pings[pings:]) == landed and result["download_pings"] == len(landed)

    rows = {r["filename"]: r for r in app.services.datasets.store.manifest(mine).to_pylist()}
    assert set(rows) == {kept, "unsplash:u2", "pexels:1"}
    u2 = rows["unsplash:u2"]
    assert (u2["caption"], u2["tags"], u2["source"], u2["license"]) == ("photo u2 on a beach", ["beach"], "unsplash",
                                                                        "Unsplash License")
    credit = json.loads(u2["attribution"])
    assert credit["photographer"] == "Ann Example" and credit["source_id"] == "u2"
    assert credit["photographer_url"].startswith("https://unsplash.com/@ann?utm_source=")
    assert json.loads(rows["pexels:1"]["attribution"])["page_url"] == "https://www.pexels.com/photo/beach-1/"

    # the credits export
    exported = client.get(f"/v1/datasets/{mine}/credits", headers=bearer("alice"))
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    assert f"{mine}-v1-credits.csv" in exported.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(exported.text)))
    assert {(r["filename"], r["photographer"], r["license"]) for r in table} >= {
        ("unsplash:u2", "Ann Example", "Unsplash License"), ("pexels:1", "Bo Example", "Pexels License")}
    assert len(table) == 3 and {r["filename"] for r in table} == set(rows)
    assert {r["license_url"] for r in table} == {"https://unsplash.com/license", "https://www.pexels.com/license/"}
    assert {r["page_url"] for r in table} >= {"https://www.pexels.com/photo/beach-1/",
                                              "https://unsplash.com/photos/u2?utm_source=atelier&utm_medium=referral"}

    # the same results again: all duplicates, no new version, no ping
    again = collect(app, mine, ["unsplash:u2", "pexels:1"])
    assert (again["added"], again["version"], again["duplicates"]) == (0, 1, 2)
    assert sorted(standin.pings[pings:]) == landed


def test_cancelled_collect_commits_nothing(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach"})
    accepted = client.post(f"/v1/datasets/{mine}/collect", headers=bearer("alice"),
                           json={"result_ids": ["unsplash:u1", "unsplash:u2"]})
    job_id = accepted.json()["id"]
    mark_running(app, job_id)
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer("alice"))
    assert cancelled.status_code == 200, cancelled.text
    run_cancelled(app, standin, mine, job_id)


def mark_running(app, job_id: str) -> None:
    """As the runner marks a job it takes (a cancel then asks it to stop rather than ending it)."""
    store = app.services.jobs.jobs
    store.save(store.get(job_id).model_copy(update={"status": "in_progress"}))


def run_cancelled(app, standin, dataset_id: str, job_id: str, on_step=None) -> None:
    """Run a collect job that ends cancelled: no version, no ping."""
    pings = len(standin.pings)
    with pytest.raises(JobCancelledError):
        run_job(app, job_id, on_step)
    assert app.services.datasets.store.versions(dataset_id) == []
    assert len(standin.pings) == pings


def test_a_cancel_in_the_middle_of_downloads_commits_and_pings_nothing(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "slow"})
    job_id = submit(app, mine, ["unsplash:u1", "unsplash:slow1", "unsplash:slow2", "unsplash:slow3"])
    mark_running(app, job_id)
    steps = []

    def cancel_once_one_landed(done: int, total: int) -> None:
        steps.append(done)
        if done == 1:  # u1 is in; the slow ones (a second each) are still downloading
            assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer("alice")).status_code == 200

    run_cancelled(app, standin, mine, job_id, cancel_once_one_landed)
    assert steps[0] == 1 and steps[-1] < 4  # stopped before every download ended


def test_failed_and_redirected_downloads_are_per_item_errors(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "troubled"})
    steps = []
    result = collect(app, mine, ["unsplash:u1", "unsplash:gone", "unsplash:hop", "unsplash:rehop", "unsplash:u2"],
                     on_step=lambda done, total: steps.append((done, total)))
    assert steps == [(done, 5) for done in range(1, 6)]  # one step per download, up to the total
    assert (result["version"], result["added"]) == (1, 3), result
    reasons = {r["filename"]: r["reason"] for r in result["rejections"]}
    assert set(reasons) == {"unsplash:gone", "unsplash:hop"}
    assert reasons["unsplash:gone"] == "failed: HTTP 404"
    # a redirect off the source's download hosts: refused before the hop is fetched; one that
    # stays on them lands
    assert reasons["unsplash:hop"].startswith("refused: redirect to 'http://localhost:")
    assert "not on the allowed hosts (127.0.0.1)" in reasons["unsplash:hop"]
    assert "hop" not in standin.image_gets and "rehop" in standin.image_gets
    rows = app.services.datasets.store.manifest(mine).to_pylist()
    assert sorted(r["filename"] for r in rows) == ["unsplash:rehop", "unsplash:u1", "unsplash:u2"]
    assert result["download_pings"] == 3 and result["download_ping_errors"] == []


def test_download_pings_stop_while_unsplash_has_no_requests_left(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach", "per_page": 10})
    pings = len(standin.pings)
    standin.ping_budget = 1  # the first ping's answer says none are left
    try:
        result = collect(app, mine, ["unsplash:u1", "unsplash:u2", "unsplash:u4"])
    finally:
        standin.ping_budget = None
    assert result["added"] == 3  # the import is whole: a ping never fails it
    assert result["download_pings"] == 1 and standin.pings[pings:] == ["u1"]
    errors = result["download_ping_errors"]
    assert [e["filename"] for e in errors] == ["unsplash:u2", "unsplash:u4"]
    assert all(e["reason"].startswith("not called: unsplash rate limit reached") for e in errors), errors


def test_the_ping_goes_only_to_the_configured_api(standin, keys):
    source = config(standin).unsplash
    assert ping_download(source, "https://evil.example/photos/u1/download") is not None
    assert ping_download(source, f"{standin.url}/photos/u4/download") is None and standin.pings[-1] == "u4"


# --- curation --------------------------------------------------------------------------------


def test_browse_edit_and_remove_write_new_versions(app, standin):
    client = app.client
    mine = dataset(client)
    client.post("/v1/collect/search", headers=bearer("alice"), json={"query": "beach", "per_page": 10})
    collect(app, mine, ["unsplash:u1", "unsplash:u2", "unsplash:u4", "pexels:1"], tags=["beach"])

    page = client.get(f"/v1/datasets/{mine}/images?limit=3", headers=bearer("alice"))
    assert page.status_code == 200, page.text
    body = page.json()
    assert (body["version"], body["latest_version"], body["total"], len(body["data"])) == (1, 1, 4, 3)
    first = body["data"][0]
    assert first["attribution"]["photographer"] in ("Ann Example", "Bo Example") and first["tags"] == ["beach"]
    assert first["attribution"]["license_url"] in ("https://unsplash.com/license", "https://www.pexels.com/license/")
    assert client.get(first["thumbnail_url"].replace("http://127.0.0.1:8000", ""),
                      headers=bearer("alice")).status_code == 200
    rest = client.get(f"/v1/datasets/{mine}/images?offset=3&limit=3", headers=bearer("alice")).json()
    ids = [i["id"] for i in body["data"] + rest["data"]]
    assert len(set(ids)) == 4

    edited = client.post(f"/v1/datasets/{mine}/edits", headers=bearer("alice"), json={
        "version": 1, "remove": [ids[1]], "captions": {ids[0]: "a new caption"}, "tags": {ids[2]: ["sea", "sand"]}})
    assert edited.status_code == 200, edited.text
    assert edited.json() | {} == {"dataset_id": mine, "version": 2, "base_version": 1, "images": 3, "removed": 1,
                                  "captions_changed": 1, "tags_changed": 1}
    v2 = {i["id"]: i for i in client.get(f"/v1/datasets/{mine}/images", headers=bearer("alice")).json()["data"]}
    assert set(v2) == {ids[0], ids[2], ids[3]}
    assert v2[ids[0]]["caption"] == "a new caption" and v2[ids[2]]["tags"] == ["sea", "sand"]
    assert v2[ids[0]]["attribution"] == first["attribution"]  # attribution survives an edit
    # version 1 is intact, image file included
    v1 = client.get(f"/v1/datasets/{mine}/images?version=1", headers=bearer("alice")).json()
    assert [i["id"] for i in v1["data"]] == ids and v1["data"][0]["caption"] == first["caption"]
    removed = next(i for i in v1["data"] if i["id"] == ids[1])
    assert app.services.files.storage.exists(removed["key"])
    assert len(list(csv.DictReader(io.StringIO(
        client.get(f"/v1/datasets/{mine}/credits?version=1", headers=bearer("alice")).text)))) == 4
    assert len(list(csv.DictReader(io.StringIO(
        client.get(f"/v1/datasets/{mine}/credits", headers=bearer("alice")).text)))) == 3

    # an edit of a version that is not the latest: 409 naming the version
    stale = client.post(f"/v1/datasets/{mine}/edits", headers=bearer("alice"),
                        json={"version": 1, "captions": {ids[0]: "x"}})
    assert stale.status_code == 409 and stale.json()["error"]["param"] == "version", stale.text
    # a caption over the limit, an unknown image, an empty edit: 400s naming the field
    long = client.post(f"/v1/datasets/{mine}/edits", headers=bearer("alice"),
                       json={"version": 2, "captions": {ids[0]: "x" * (MAX_CAPTION_LENGTH + 1)}})
    assert long.status_code == 400 and long.json()["error"]["param"] == f"captions.{ids[0]}", long.text
    unknown = client.post(f"/v1/datasets/{mine}/edits", headers=bearer("alice"),
                          json={"version": 2, "remove": [ids[1]]})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "remove", unknown.text
    empty = client.post(f"/v1/datasets/{mine}/edits", headers=bearer("alice"), json={"version": 2})
    assert empty.status_code == 400, empty.text
    assert app.services.datasets.store.versions(mine) == [1, 2]
    missing = client.get(f"/v1/datasets/{mine}/images?version=7", headers=bearer("alice"))
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "version"

    # another owner sees none of it
    for method, url, body in (("GET", f"/v1/datasets/{mine}/images", None),
                              ("GET", f"/v1/datasets/{mine}/credits", None),
                              ("POST", f"/v1/datasets/{mine}/edits", {"version": 2, "remove": [ids[0]]})):
        answer = client.request(method, url, headers=bearer("bob"), json=body)
        assert answer.status_code == 404 and "Ann Example" not in answer.text, (url, answer.text)
    assert app.services.datasets.store.versions(mine) == [1, 2]


def test_credits_cells_never_run_as_formulas(app):
    from storage.datasets import ImageItem
    from tests.keyed_app import png

    store = app.services.datasets.store
    mine = dataset(app.client)
    store.add_images(mine, [ImageItem("a.png", png(seed=4), attribution={"photographer": "=HYPERLINK(\"x\")"})])
    text = app.client.get(f"/v1/datasets/{mine}/credits", headers=bearer("alice")).text
    assert list(csv.DictReader(io.StringIO(text)))[0]["photographer"] == "'=HYPERLINK(\"x\")"
