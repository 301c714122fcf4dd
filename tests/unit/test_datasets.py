"""storage.datasets on a local folder and on S3 (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import io
import threading
import tracemalloc
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from storage.datasets import (
    MANIFEST_SCHEMA,
    DatasetExistsError,
    DatasetNotFoundError,
    DatasetStore,
    DatasetTooLargeError,
    ImageItem,
    InvalidDatasetInputError,
    check_prefix_allowed,
    expand_uploads,
    expand_zip,
    is_dataset_image_key,
)
from storage.keys import output_key
from tests.media import noise_image

MiB = 1024 * 1024
BOMB_BYTES = 100 * 1000 * 1000  # zeros: deflates to about 100 KB
PEAK_LIMIT = 8 * MiB  # a read chunk or two, never the expanded bytes


def eight_images(seed: int = 0) -> list[ImageItem]:
    return [ImageItem(f"img{i}.png", noise_image(24 + 8 * i, 16 + 4 * i, seed * 100 + i), caption=f"caption {i}",
                      tags=["cat", f"t{i}"], source="test") for i in range(8)]


@pytest.fixture()
def store(storage) -> DatasetStore:
    return DatasetStore(storage)


@pytest.fixture()
def dataset_id(store) -> str:
    return store.create("cats", description="eight cats", trigger_word="sks", license="cc-by-4.0").id


def test_upload_eight_images_with_captions(store, dataset_id):
    items = eight_images()
    result = store.add_images(dataset_id, items)
    assert (result.version, result.added, result.images, result.duplicates, result.rejected) == (1, 8, 8, [], [])

    table = store.manifest(dataset_id)
    assert table.num_rows == 8
    assert table.schema.remove_metadata() == MANIFEST_SCHEMA
    rows = {r["filename"]: r for r in table.to_pylist()}
    for i, item in enumerate(items):
        row = rows[item.filename]
        assert (row["width"], row["height"]) == (24 + 8 * i, 16 + 4 * i)
        assert row["sha256"] == hashlib.sha256(item.data).hexdigest()
        assert (row["caption"], row["tags"], row["source"], row["license"]) == (
            f"caption {i}", ["cat", f"t{i}"], "test", "cc-by-4.0")
        assert row["key"] == f"datasets/{dataset_id}/images/{row['sha256']}.png"
        assert is_dataset_image_key(row["key"])
        assert store.storage.get_bytes(row["key"]) == item.data

    info = store.get(dataset_id)
    assert (info.name, info.latest_version, info.images) == ("cats", 1, 8)
    assert info.total_bytes == sum(len(i.data) for i in items)
    assert [v.version for v in info.versions] == [1]
    assert [d.id for d in store.list()] == [dataset_id]


def test_same_images_again_are_all_duplicates(store, dataset_id):
    store.add_images(dataset_id, eight_images())
    again = store.add_images(dataset_id, eight_images())
    assert (again.added, again.version, again.images) == (0, 1, 8)
    assert sorted(again.duplicates) == sorted(f"img{i}.png" for i in range(8))
    assert store.versions(dataset_id) == [1]
    # within one batch too
    twice = store.add_images(dataset_id, [ImageItem("a.png", noise_image(8, 8, 99)), ImageItem("b.png", noise_image(8, 8, 99))])
    assert (twice.added, twice.duplicates) == (1, ["b.png"])


def test_new_version_leaves_old_one_readable(store, dataset_id):
    store.add_images(dataset_id, eight_images(seed=0))
    v1 = store.manifest(dataset_id, 1)
    result = store.add_images(dataset_id, eight_images(seed=1)[:3])
    assert (result.version, result.added, result.images) == (2, 3, 11)
    assert store.manifest(dataset_id, 1).equals(v1)
    assert store.manifest(dataset_id).num_rows == 11
    assert store.manifest(dataset_id, 2).column("sha256").to_pylist()[:8] == v1.column("sha256").to_pylist()
    assert store.manifest(dataset_id, 0).num_rows == 0
    assert [(v.version, v.images, v.added) for v in store.get(dataset_id).versions] == [(1, 8, 8), (2, 11, 3)]
    with pytest.raises(DatasetNotFoundError):
        store.manifest(dataset_id, 3)


def test_corrupt_image_is_rejected_by_name_and_the_rest_lands(store, dataset_id):
    good = eight_images()
    truncated = noise_image(32, 32, 7)[:60]
    items = good[:4] + [ImageItem("broken.png", truncated), ImageItem("notes.png", b"hello, not an image")] + good[4:]
    result = store.add_images(dataset_id, items)
    assert result.added == 8
    assert {r.filename: r.reason for r in result.rejected}.keys() == {"broken.png", "notes.png"}
    assert all(r.reason for r in result.rejected)
    assert set(store.manifest(dataset_id).column("filename").to_pylist()) == {i.filename for i in good}


def test_files_with_txt_captions_and_caption_field(store, dataset_id):
    files = [("a.png", noise_image(16, 16, 1)), ("a.txt", "a caption from a file\n".encode()),
             ("b.png", noise_image(16, 16, 2)), ("c.png", noise_image(16, 16, 3)), ("orphan.txt", b"no image")]
    result = store.add_files(dataset_id, files, captions={"c.png": "from the field"})
    assert result.added == 3 and [r.filename for r in result.rejected] == ["orphan.txt"]
    captions = dict(zip(*store.manifest(dataset_id).select(["filename", "caption"]).to_pydict().values()))
    assert captions == {"a.png": "a caption from a file", "b.png": "", "c.png": "from the field"}


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_zip_with_captions_lands(store, dataset_id):
    archive = _zip({"set/one.png": noise_image(16, 16, 1), "set/one.txt": b"first", "set/two.jpg": noise_image(16, 16, 2),
                    "__MACOSX/set/._one.png": b"junk", "set/.DS_Store": b"junk"})
    result = store.add_zip(dataset_id, archive)
    assert result.added == 2 and result.rejected == []
    rows = {r["filename"]: r for r in store.manifest(dataset_id).to_pylist()}
    assert rows["set/one.png"]["caption"] == "first" and rows["set/two.jpg"]["caption"] == ""
    assert rows["set/one.png"]["source"] == "zip:archive.zip"


def _zeros_zip(entries: dict[str, int], extra: dict[str, bytes] | None = None) -> bytes:
    """A deflated zip with an entry of ``size`` zero bytes per name, written in 1 MiB chunks so
    the test never holds the expanded bytes itself."""
    buffer = io.BytesIO()
    chunk = bytes(MiB)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, size in entries.items():
            with archive.open(name, "w") as entry:
                for start in range(0, size, MiB):
                    entry.write(chunk[:min(MiB, size - start)])
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def zip_bomb() -> bytes:
    bomb = _zeros_zip({"bomb.png": BOMB_BYTES}, extra={"ok.png": noise_image(16, 16, 1)})
    assert len(bomb) < 200_000  # a small upload
    return bomb


def _peak_memory(fn):
    """``(fn's result or exception, peak bytes Python allocated while it ran)``."""
    tracemalloc.start()
    try:
        try:
            outcome = fn()
        except Exception as exc:  # returned, so the caller can check it after measuring
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zip_bomb_is_refused_before_it_is_inflated(zip_bomb):
    outcome, peak = _peak_memory(lambda: expand_zip(zip_bomb, "bomb.zip", max_total_bytes=64 * MiB))
    assert isinstance(outcome, DatasetTooLargeError), outcome
    assert outcome.param == "files" and "bomb.zip" in outcome.message and str(64 * MiB) in outcome.message
    assert peak < PEAK_LIMIT, peak  # the 100 MB were never allocated


def test_zip_entry_over_the_image_limit_is_rejected_unread_and_the_rest_lands(zip_bomb):
    (files, rejected), peak = _peak_memory(
        lambda: expand_zip(zip_bomb, max_total_bytes=200 * 1000 * 1000, max_entry_bytes=MiB))
    assert [name for name, _ in files] == ["ok.png"]
    assert [(r.filename, r.reason) for r in rejected] == [
        ("bomb.png", f"file is {BOMB_BYTES} bytes, over the limit of {MiB}")]
    assert peak < PEAK_LIMIT, peak


def _lie_about_sizes(archive: bytes, size: int) -> bytes:
    """``archive`` (one stored-size-less entry) with its declared uncompressed size replaced by
    ``size`` in the local and central headers, as a crafted bomb would."""
    data = bytearray(archive)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature)
        data[at + offset:at + offset + 4] = size.to_bytes(4, "little")
    return bytes(data)


def test_zip_that_understates_its_sizes_stops_at_the_declared_size():
    liar = _lie_about_sizes(_zeros_zip({"liar.png": BOMB_BYTES}), 1000)
    assert zipfile.ZipFile(io.BytesIO(liar)).getinfo("liar.png").file_size == 1000
    (files, rejected), peak = _peak_memory(lambda: expand_zip(liar, max_total_bytes=4 * MiB, max_entry_bytes=MiB))
    assert files == [] and [r.filename for r in rejected] == ["liar.png"]
    assert "cannot read archive entry" in rejected[0].reason
    assert peak < PEAK_LIMIT, peak


def test_zips_of_one_upload_share_the_expansion_budget():
    half = _zeros_zip({"a.png": 600 * 1024})
    files, rejected = expand_uploads([("one.zip", half)], max_total_bytes=MiB, max_entry_bytes=MiB)
    assert [(name, len(data)) for name, data in files] == [("a.png", 600 * 1024)]
    with pytest.raises(DatasetTooLargeError) as err:
        expand_uploads([("one.zip", half), ("two.zip", half)], max_total_bytes=MiB, max_entry_bytes=MiB)
    assert err.value.param == "files" and "two.zip" in err.value.message


def test_zip_bomb_upload_adds_nothing(storage, zip_bomb):
    store = DatasetStore(storage, max_expanded_bytes=64 * MiB)
    dataset_id = store.create("bombed").id
    with pytest.raises(DatasetTooLargeError):
        store.add_files(dataset_id, [("bomb.zip", zip_bomb)])
    assert store.versions(dataset_id) == [] and store.storage.list(f"datasets/{dataset_id}/images/") == []


def test_max_pixels_at_the_limit_lands_and_one_past_is_rejected(storage):
    store = DatasetStore(storage, max_pixels=16 * 16)
    dataset_id = store.create("tiny").id
    result = store.add_images(dataset_id, [ImageItem("at.png", noise_image(16, 16, 1)), ImageItem("past.png", noise_image(17, 16, 2)),
                                           ImageItem("tall.png", noise_image(16, 17, 3))])
    assert (result.added, result.images) == (1, 1)
    assert {r.filename: r.reason for r in result.rejected} == {
        "past.png": "image is 17x16, over the limit of 256 pixels",
        "tall.png": "image is 16x17, over the limit of 256 pixels"}
    assert store.manifest(dataset_id).column("filename").to_pylist() == ["at.png"]


@pytest.mark.parametrize("evil", ["../escape.png", "set/../../escape.png", "/etc/abs.png", "C:/win.png"])
def test_zip_with_escaping_entry_is_refused_whole(store, dataset_id, evil):
    archive = _zip({"ok.png": noise_image(16, 16, 1), evil: noise_image(16, 16, 2)})
    with pytest.raises(InvalidDatasetInputError) as err:
        store.add_zip(dataset_id, archive)
    assert err.value.param == "files" and evil in err.value.message
    with pytest.raises(InvalidDatasetInputError):
        store.add_files(dataset_id, [("upload.zip", archive)])
    assert store.manifest(dataset_id).num_rows == 0
    assert store.storage.list(f"datasets/{dataset_id}/images/") == []


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "", ".hidden", "x" * 101, "sp ace", "new\nline"])
def test_bad_names_are_rejected(store, name):
    with pytest.raises(InvalidDatasetInputError) as err:
        store.create(name)
    assert err.value.param == "name"
    assert store.list() == []


def test_bad_ids_and_prefixes_cannot_escape(store, dataset_id):
    for bad in ("../" + dataset_id, "/" + dataset_id, "..", "a/b", "_names"):
        with pytest.raises(DatasetNotFoundError):
            store.get(bad)
    for bad in ("../outside/", "/etc/", "file:///etc/", "s3://other-bucket/x/", "a/../../b", "s3://b/../x/",
                "uploads/batch/", "imports/../uploads/"):
        with pytest.raises(InvalidDatasetInputError):
            check_prefix_allowed(bad, allowed_prefixes=["s3://allowed/", "imports/"])
    assert check_prefix_allowed("imports/batch/", ["imports/"]) == "imports/batch/"
    assert check_prefix_allowed("s3://allowed/sub/", ["s3://allowed/"]) == "s3://allowed/sub/"
    with pytest.raises(InvalidDatasetInputError):
        store.add_from_prefix(dataset_id, "../up/")


def test_duplicate_name_conflicts(store, dataset_id):
    with pytest.raises(DatasetExistsError):
        store.create("cats")


def test_concurrent_adds_lose_nothing(store, dataset_id):
    batches = [eight_images(seed=s)[:3] for s in range(4)]
    results, errors = [], []

    def add(items):
        try:
            results.append(store.add_images(dataset_id, items))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(r.version for r in results) == [1, 2, 3, 4]
    table = store.manifest(dataset_id)
    assert table.num_rows == 12
    assert set(table.column("sha256").to_pylist()) == {
        hashlib.sha256(i.data).hexdigest() for b in batches for i in b}


def test_prefix_import_with_captions(store, dataset_id, tmp_path):
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(noise_image(16, 16, 1))
    (folder / "a.txt").write_text("caption a")
    (folder / "sub" / "b.png").write_bytes(noise_image(16, 16, 2))
    (folder / "junk.png").write_bytes(b"junk")
    result = store.add_from_prefix(dataset_id, str(folder))
    assert result.added == 2 and [r.filename for r in result.rejected] == ["junk.png"]
    captions = dict(zip(*store.manifest(dataset_id).select(["filename", "caption"]).to_pydict().values()))
    assert captions == {"a.png": "caption a", "sub/b.png": ""}
    # a prefix under imports/ in the storage root (works on S3 too)
    store.storage.put_bytes("imports/x/c.png", noise_image(16, 16, 3))
    store.storage.put_bytes("imports/x/c.txt", b"caption c")
    inside = store.add_from_prefix(dataset_id, "imports/x/")
    assert inside.added == 1 and store.manifest(dataset_id).num_rows == 3


def test_adding_job_outputs(store, dataset_id):
    key = output_key("job_0000000000000000001", 0)
    store.storage.put_bytes(key, noise_image(16, 16, 5))
    result = store.add_outputs(dataset_id, [key, "jobs/job_x.json", "outputs/../jobs/x", "outputs/missing.png"],
                               captions={key: "a generated cat"})
    assert result.added == 1 and len(result.rejected) == 3
    row = store.manifest(dataset_id).to_pylist()[0]
    assert (row["caption"], row["source"]) == ("a generated cat", key)


def test_adding_job_outputs_by_job_id_captions_them_with_the_prompt(store, dataset_id):
    from storage.jobs import JobOutput, JobStore

    jobs = JobStore(store.storage)

    def finished_job(request: dict, outputs: list[tuple[bytes, str]], result: dict | None = None) -> str:
        record = jobs.create("images.generations", request)
        for index, (data, content_type) in enumerate(outputs):
            key = output_key(record.id, index, "png" if content_type == "image/png" else "mp4")
            store.storage.put_bytes(key, data, content_type=content_type)
            record.outputs.append(JobOutput(key=key, content_type=content_type, width=16, height=16))
        jobs.save(record.model_copy(update={"status": "completed", "result": result}))
        return record.id

    fox = finished_job({"sdxl": {"prompt": "a red fox", "seed": 1}},
                       [(noise_image(16, 16, 11), "image/png"), (noise_image(16, 16, 12), "image/png")])
    refined = finished_job({"sdxl": {"prompt": "owl"}}, [(noise_image(16, 16, 13), "image/png")],
                           result={"prompt": "a snowy owl at dusk, detailed"})
    video = finished_job({"prompt": "a river"}, [(b"\x00\x00\x00\x18ftypmp42", "video/mp4")])
    progress = []
    result = store.add_job_outputs(dataset_id, [fox, refined, video, "job_doesnotexist"], tags=["generated"],
                                   progress=lambda done, total: progress.append((done, total)))
    assert (result.version, result.added, result.images) == (1, 3, 3)
    assert {r.filename: r.reason for r in result.rejected} == {
        video: "job has no image outputs (status completed)", "job_doesnotexist": "no such job"}
    assert progress[-1] == (3, 3)  # one step per image output
    rows = store.manifest(dataset_id).to_pylist()
    fox_keys = [o.key for o in jobs.get(fox).outputs]
    assert [(r["source"], r["caption"], r["tags"]) for r in rows] == [
        (fox_keys[0], "a red fox", ["generated"]), (fox_keys[1], "a red fox", ["generated"]),
        (jobs.get(refined).outputs[0].key, "a snowy owl at dusk, detailed", ["generated"])]
    assert rows[0]["sha256"] == hashlib.sha256(store.storage.get_bytes(fox_keys[0])).hexdigest()
    again = store.add_job_outputs(dataset_id, [fox])
    assert (again.added, again.version, len(again.duplicates)) == (0, 1, 2)


def test_delete_needs_confirmation(store, dataset_id):
    store.add_images(dataset_id, eight_images())
    for wrong in (None, "", "dogs", "CATS", dataset_id):  # the id is in the URL already: it confirms nothing
        with pytest.raises(InvalidDatasetInputError) as err:
            store.delete(dataset_id, confirm=wrong)
        assert err.value.param == "confirm"
    assert store.get(dataset_id).images == 8
    assert store.delete(dataset_id, confirm="cats") > 8
    with pytest.raises(DatasetNotFoundError):
        store.get(dataset_id)
    assert store.storage.list(f"datasets/{dataset_id}/") == []
    assert store.create("cats").id != dataset_id  # the name is free again


# --- the HTTP router and the import job, without Ray ------------------------------------------


UPLOAD_LIMIT = 256 * 1024  # max_upload_bytes of the app under test


class FakeQueue:
    """The task queue, as JobsService.submit uses it."""

    def __init__(self):
        self.sent = []

    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        self.sent.append((name, kwargs, task_id))


@pytest.fixture()
def api(storage):
    """``(TestClient, ctx)`` over the datasets router and the real DatasetsService; ``ctx.configure(
    **DatasetImportConfig)`` rebuilds the service with another ``dataset_import`` config."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from fastapi.testclient import TestClient

    from api.datasets.router import router
    from api.datasets.service import build_datasets_service
    from api.files.service import FilesService
    from api.jobs.service import JobsService
    from api.uploads import Uploads
    from deployments.errors import AtelierError
    from graphs.job_runner import JobQueueConfig
    from storage.jobs import JobStore
    from storage.url_import import DatasetImportConfig

    files = FilesService(storage, presign_urls=False)
    jobs = JobsService(JobStore(storage), FakeQueue(), JobQueueConfig(broker_url="x", backend_url="y"), files)
    app = FastAPI()
    app.include_router(router)
    app.state.jobs = jobs
    app.state.uploads = Uploads(storage, UPLOAD_LIMIT, 4096 * 4096)

    def configure(**import_config):
        app.state.datasets = build_datasets_service(storage, jobs, files, DatasetImportConfig(**import_config),
                                                    UPLOAD_LIMIT)

    configure(allowed_prefixes=[])

    @app.exception_handler(AtelierError)
    async def _error(request, exc):
        return JSONResponse(exc.to_body(), status_code=exc.status_code)

    with TestClient(app) as client:
        yield client, SimpleNamespace(storage=storage, jobs=jobs.jobs, configure=configure)


def test_api_create_list_get_delete(api):
    client, _ = api
    created = client.post("/v1/datasets", json={"name": "dogs", "trigger_word": "sks"})
    assert created.status_code == 201 and created.json()["object"] == "dataset"
    dataset_id = created.json()["id"]
    conflict = client.post("/v1/datasets", json={"name": "dogs"})
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "name"
    bad = client.post("/v1/datasets", json={"name": "../dogs"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
    assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [dataset_id]

    files = [("files", (f"d{i}.png", noise_image(16, 16, i), "image/png")) for i in range(5)]
    files += [("files", ("d0.txt", b"a good dog", "text/plain")),
              ("files[]", ("broken.png", b"\x89PNG broken", "image/png"))]
    upload = client.post(f"/v1/datasets/{dataset_id}/images", files=files,
                         data={"captions": '{"d1.png": "another dog"}', "tags": "dog, pet"})
    assert upload.status_code == 200, upload.text
    body = upload.json()
    assert (body["version"], body["added"], body["images"]) == (1, 5, 5)
    assert [r["filename"] for r in body["rejected"]] == ["broken.png"]
    rows = {r["filename"]: r for r in DatasetStore(api[1].storage).manifest(dataset_id).to_pylist()}
    assert rows["d0.png"]["caption"] == "a good dog" and rows["d1.png"]["caption"] == "another dog"
    assert rows["d2.png"]["tags"] == ["dog", "pet"]

    shown = client.get(f"/v1/datasets/{dataset_id}").json()
    assert (shown["images"], shown["latest_version"], len(shown["versions"])) == (5, 1, 1)
    assert len(shown["thumbnails"]) == 4
    assert all("/v1/files/datasets/" + dataset_id + "/images/" in url for url in shown["thumbnails"])

    assert client.get("/v1/datasets/nope").status_code == 404
    refused = client.delete(f"/v1/datasets/{dataset_id}")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "confirm"
    assert client.delete(f"/v1/datasets/{dataset_id}?confirm=dogs").json()["deleted"] is True
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404


def test_api_zip_upload_and_bad_inputs(api):
    client, _ = api
    dataset_id = client.post("/v1/datasets", json={"name": "zips"}).json()["id"]
    archive = _zip({"a.png": noise_image(16, 16, 1), "a.txt": b"zipped"})
    ok = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", ("set.zip", archive, "application/zip"))])
    assert ok.status_code == 200 and ok.json()["added"] == 1
    evil = _zip({"../../etc/x.png": noise_image(16, 16, 2)})
    refused = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", ("evil.zip", evil, "application/zip"))])
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "files"
    bad_captions = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", ("b.png", noise_image(8, 8, 3)))],
                               data={"captions": "[1, 2]"})
    assert bad_captions.status_code == 400 and bad_captions.json()["error"]["param"] == "captions"
    too_big = client.post(f"/v1/datasets/{dataset_id}/images",
                          files=[("files", (f"{i}.bin", b"x" * 100_000)) for i in range(3)])
    assert too_big.status_code == 413


def test_api_zip_limits_come_from_the_upload_limit_and_config(api, zip_bomb):
    client, ctx = api
    dataset_id = client.post("/v1/datasets", json={"name": "bombs"}).json()["id"]
    upload_limit = UPLOAD_LIMIT  # 256 KiB here; zips may expand to 4x that
    assert len(zip_bomb) < upload_limit
    bomb = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", ("bomb.zip", zip_bomb))])
    assert bomb.status_code == 413, bomb.text
    assert bomb.json()["error"]["param"] == "files" and str(4 * upload_limit) in bomb.json()["error"]["message"]
    # an entry over the per-file upload limit is rejected by name; the rest lands
    mixed = _zeros_zip({"huge.png": upload_limit + 1}, extra={"fine.png": noise_image(16, 16, 4)})
    landed = client.post(f"/v1/datasets/{dataset_id}/images", files=[("files", ("mixed.zip", mixed))])
    assert landed.status_code == 200, landed.text
    assert landed.json()["added"] == 1 and [r["filename"] for r in landed.json()["rejected"]] == ["huge.png"]
    # an explicit dataset_import.max_zip_expanded_bytes wins over 4 x max_upload_bytes
    ctx.configure(allowed_prefixes=[], max_zip_expanded_bytes=1024)
    refused = client.post(f"/v1/datasets/{dataset_id}/images",
                          files=[("files", ("small.zip", _zip({"b.png": noise_image(32, 32, 5)})))])
    assert refused.status_code == 413 and "1024" in refused.json()["error"]["message"]


def test_api_max_pixels_comes_from_config(api):
    client, ctx = api
    ctx.configure(allowed_prefixes=[], max_pixels=16 * 16)
    dataset_id = client.post("/v1/datasets", json={"name": "small"}).json()["id"]
    files = [("files", ("at.png", noise_image(16, 16, 1))), ("files", ("past.png", noise_image(17, 16, 2)))]
    body = client.post(f"/v1/datasets/{dataset_id}/images", files=files).json()
    assert body["added"] == 1
    assert body["rejected"] == [{"filename": "past.png", "reason": "image is 17x16, over the limit of 256 pixels"}]


def test_api_imports_validate_then_record_a_job(api):
    client, ctx = api
    dataset_id = client.post("/v1/datasets", json={"name": "web"}).json()["id"]
    url = f"/v1/datasets/{dataset_id}/imports"
    cases = [({"urls": ["https://example.com/a.png", "ftp://example.com/b.png"]}, "urls.1"),
             ({"urls": []}, "urls"),
             ({"prefix": "../outside/"}, "prefix"),
             ({"prefix": "/etc/"}, "prefix"),
             ({"output_keys": ["jobs/x.json"]}, "output_keys.0"),
             ({"urls": ["https://example.com/a.png"], "prefix": "x/"}, "prefix")]
    for body, param in cases:
        response = client.post(url, json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    assert client.post("/v1/datasets/missing/imports", json={"prefix": "x/"}).status_code == 404
    accepted = client.post(url, json={"urls": ["https://example.com/a.png"], "tags": ["web"]})
    assert accepted.status_code == 202
    record = ctx.jobs.get(accepted.json()["id"])
    assert record.kind == "datasets.import"
    assert record.request["urls"] == ["https://example.com/a.png"] and record.request["dataset_id"] == dataset_id
    assert record.request["config"]["allow_private_hosts"] == []


def test_api_refuses_a_prefix_import_of_atelier_data_even_if_configured(api):
    """Issue 18, finding 2: `{"prefix": "uploads/"}` copied other jobs' private inputs into the
    caller's dataset. Only configured roots under imports/ (or outside the storage root) import."""
    client, ctx = api
    ctx.configure(allowed_prefixes=["uploads/", "training/", "datasets/", "outputs/", "imports/"])
    ctx.storage.put_bytes("uploads/upload_1/image", noise_image(16, 16, 42))
    dataset_id = client.post("/v1/datasets", json={"name": "thief"}).json()["id"]
    url = f"/v1/datasets/{dataset_id}/imports"
    for prefix in ("uploads/", "training/", "datasets/", "outputs/", "jobs/", "workflows/", "fine_tuning/", "u"):
        response = client.post(url, json={"prefix": prefix})
        assert response.status_code == 400 and response.json()["error"]["param"] == "prefix", (prefix, response.text)
    assert client.post(url, json={"prefix": "imports/batch/"}).status_code == 202


def test_import_job_from_a_prefix_reports_progress_and_cancels(store, dataset_id):
    from deployments.errors import JobCancelledError
    from graphs.job_runner import JobContext
    from graphs.dataset_jobs import dataset_import
    from storage.jobs import JobStore

    roots = {"allowed_prefixes": ["imports/"]}  # the configured import root
    for i in range(3):
        store.storage.put_bytes(f"imports/batch/{i}.png", noise_image(16, 16, i))
    store.storage.put_bytes("imports/batch/0.txt", b"zero")
    jobs = JobStore(store.storage)
    record = jobs.create("datasets.import", {"dataset_id": dataset_id, "prefix": "imports/batch/", "tags": ["b"],
                                             "config": roots})
    ctx = JobContext(jobs, record)
    dataset_import(ctx, {})
    assert ctx.record.result["added"] == 3 and ctx.record.result["version"] == 1
    assert (ctx.record.step, ctx.record.total_steps, ctx.record.stage) == (3, 3, "import")
    assert store.manifest(dataset_id).column("tags").to_pylist() == [["b"]] * 3

    for i in range(3, 6):
        store.storage.put_bytes(f"imports/more/{i}.png", noise_image(16, 16, i))
    cancelled = jobs.create("datasets.import", {"dataset_id": dataset_id, "prefix": "imports/more/", "config": roots})
    jobs.save(cancelled.model_copy(update={"status": "in_progress"}))
    jobs.request_cancel(cancelled.id)
    with pytest.raises(JobCancelledError):
        dataset_import(JobContext(jobs, jobs.get(cancelled.id)), {})
    assert store.versions(dataset_id) == [1]  # nothing committed

    # the job applies the recorded config's max_pixels
    store.storage.put_bytes("imports/wide/wide.png", noise_image(17, 16, 9))
    store.storage.put_bytes("imports/wide/fits.png", noise_image(16, 16, 10))
    limited = jobs.create("datasets.import", {"dataset_id": dataset_id, "prefix": "imports/wide/",
                                              "config": {"max_pixels": 16 * 16, **roots}})
    ctx = JobContext(jobs, limited)
    dataset_import(ctx, {})
    assert (ctx.record.result["added"], ctx.record.result["rejected"]) == (1, 1)
    assert ctx.record.result["rejections"][0]["filename"] == "imports/wide/wide.png"

    outside = jobs.create("datasets.import", {"dataset_id": dataset_id, "prefix": "/etc/"})
    with pytest.raises(Exception) as err:
        dataset_import(JobContext(jobs, outside), {})
    assert getattr(err.value, "param", None) == "prefix"


def test_an_add_racing_a_delete_leaves_nothing_behind(store, dataset_id):
    """Issue 18, finding 12 (races): a dataset deleted while images are being added. The delete
    goes first (info, then files, then the name); the add's images and manifest, written after,
    used to stay under the deleted id, listed nowhere. Now the add fails and removes them."""
    writer = store.writer(dataset_id)
    writer.add_many(eight_images(seed=5))  # images uploaded, manifest not yet written
    store.delete(dataset_id, confirm="cats")
    with pytest.raises(DatasetNotFoundError):
        writer.commit()
    assert store.storage.list(f"datasets/{dataset_id}/") == []
    assert dataset_id not in [d.id for d in store.list()]


def big_image() -> bytes:
    """A 600x400 PNG small in bytes (smooth gradients compress): under the tests' upload limit."""
    x, y = np.meshgrid(np.linspace(0, 255, 600), np.linspace(0, 255, 400))
    out = io.BytesIO()
    Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_image_listing_and_card_serve_small_thumbnails_made_once(api):
    client, ctx = api
    dataset_id = client.post("/v1/datasets", json={"name": "wide"}).json()["id"]
    files = [("files", ("big.png", big_image(), "image/png")),
             ("files", ("small.png", noise_image(40, 30, 2), "image/png"))]
    assert client.post(f"/v1/datasets/{dataset_id}/images", files=files).status_code == 200
    listed = {i["filename"]: i for i in client.get(f"/v1/datasets/{dataset_id}/images").json()["data"]}
    big, small = listed["big.png"], listed["small.png"]
    assert small["thumbnail_url"] == small["url"]  # already small: its own thumbnail
    assert big["thumbnail_url"] != big["url"] and big["thumbnail_url"].endswith(f"/thumbs/{big['id']}.jpg")
    key = big["thumbnail_url"].split("/v1/files/", 1)[1]
    assert is_dataset_image_key(key)  # served by the files route like the image itself
    with Image.open(io.BytesIO(ctx.storage.get_bytes(key))) as thumb:
        assert (thumb.format, thumb.size) == ("JPEG", (256, 171))
        # a picture of the image, not of something else: close to the image scaled down
        expected = Image.open(io.BytesIO(ctx.storage.get_bytes(big["key"]))).convert("RGB").resize((256, 171))
        diff = np.abs(np.asarray(thumb.convert("RGB"), dtype=int) - np.asarray(expected, dtype=int)).mean()
        assert diff < 20, diff
    # the dataset card shows the same thumbnails, and later listings reuse the stored file
    ctx.storage.put_bytes(key, b"stored once")
    card = client.get(f"/v1/datasets/{dataset_id}").json()["thumbnails"]
    assert big["thumbnail_url"] in card and small["url"] in card
    assert big["thumbnail_url"] in [i["thumbnail_url"] for i in client.get(f"/v1/datasets/{dataset_id}/images").json()["data"]]
    assert ctx.storage.get_bytes(key) == b"stored once"
    assert client.delete(f"/v1/datasets/{dataset_id}?confirm=wide").status_code == 200
    assert not ctx.storage.exists(key)  # thumbnails go with the dataset
