"""storage.fs / storage.keys on a local folder and on S3 (moto's server on loopback)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from storage import InvalidKeyError, ObjectNotFoundError, Storage, StorageError
from storage import keys as K
from tests.conftest import S3_BUCKET as BUCKET

REPO_ROOT = Path(__file__).resolve().parents[2]
BUCKET = "atelier-test"


# -- construction -------------------------------------------------------------------------


def test_local_roots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = Storage("var/storage")
    assert rel.protocol == "file"
    assert rel.root == str(tmp_path / "var" / "storage")
    assert os.path.isdir(rel.root)
    url = Storage(f"file://{tmp_path}/u")
    assert url.root == str(tmp_path / "u") and os.path.isdir(url.root)
    assert Storage(str(tmp_path / "abs")).root == str(tmp_path / "abs")


def test_s3_root_and_env_endpoint(monkeypatch):
    monkeypatch.setenv("ATELIER_S3_ENDPOINT_URL", "http://127.0.0.1:1")
    s = Storage("s3://bkt/some/prefix/")
    assert s.protocol == "s3" and s.root == "s3://bkt/some/prefix"
    assert s.storage_options["endpoint_url"] == "http://127.0.0.1:1"
    assert s.full_path("a/b.png") == "s3://bkt/some/prefix/a/b.png"
    given = Storage("s3://bkt", {"client_kwargs": {"endpoint_url": "http://127.0.0.1:2"}})
    assert "endpoint_url" not in given.storage_options  # explicit endpoint wins
    with pytest.raises(ValueError):
        Storage("s3://")
    with pytest.raises(ValueError):
        Storage("gs://bkt/x")


# -- round trips --------------------------------------------------------------------------


def test_bytes_json_file_round_trip(storage, tmp_path):
    assert storage.put_bytes("a/b/c.bin", b"\x00\x01payload") == "a/b/c.bin"
    assert storage.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    storage.put_bytes("a/b/c.bin", b"second")
    assert storage.get_bytes("a/b/c.bin") == b"second"

    obj = {"x": 1, "s": "héllo", "l": [1, 2.5, None], "nested": {"ok": True}}
    storage.put_json("meta/thing.json", obj)
    assert storage.get_json("meta/thing.json") == obj

    src = tmp_path / "src.dat"
    payload = os.urandom(300_000)
    src.write_bytes(payload)
    assert storage.put_file("files/src.dat", src) == "files/src.dat"
    assert storage.get_bytes("files/src.dat") == payload
    assert storage.size("files/src.dat") == len(payload)
    with storage.open("files/src.dat") as f:
        assert f.read(10) == payload[:10]
        assert f.read() == payload[10:]
    with storage.open("meta/thing.json", "r") as f:
        assert "héllo" in f.read()
    with pytest.raises(ValueError):
        storage.open("files/src.dat", "wb")


def test_content_type_on_s3(s3_server, tmp_path):
    storage = Storage(f"s3://{BUCKET}/ct-{uuid.uuid4().hex[:10]}", s3_server.storage_options())
    src = tmp_path / "clip.bin"
    src.write_bytes(b"mp4")
    storage.put_file("vid/0.mp4", src)
    storage.put_file("vid/1.bin", src, content_type="video/mp4")
    assert storage.fs.info(storage._path("vid/0.mp4"))["ContentType"] == "video/mp4"
    assert storage.fs.info(storage._path("vid/1.bin"))["ContentType"] == "video/mp4"
    storage.put_bytes("img/0.png", b"png-bytes")
    storage.put_bytes("img/raw", b"x", content_type="image/webp")
    storage.put_json("img/meta.json", {})
    assert storage.fs.info(storage._path("img/0.png"))["ContentType"] == "image/png"
    assert storage.fs.info(storage._path("img/raw"))["ContentType"] == "image/webp"
    assert storage.fs.info(storage._path("img/meta.json"))["ContentType"] == "application/json"


def test_put_if_absent_creates_once_and_never_overwrites(storage):
    assert storage.put_if_absent("claims/a.json", b'{"by": 1}', "application/json") is True
    assert storage.put_if_absent("claims/a.json", b'{"by": 2}', "application/json") is False
    assert storage.get_bytes("claims/a.json") == b'{"by": 1}'
    assert storage.list("claims/") == ["claims/a.json"]  # no temp file left behind


def test_put_if_absent_has_exactly_one_winner_among_racing_writers(storage):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: storage.put_if_absent("claims/race", str(i).encode()), range(8)))
    assert won.count(True) == 1
    assert storage.get_bytes("claims/race") == str(won.index(True)).encode()


def test_missing_keys(storage):
    with pytest.raises(ObjectNotFoundError):
        storage.get_bytes("nope/missing.bin")
    with pytest.raises(FileNotFoundError):  # ObjectNotFoundError is a FileNotFoundError
        storage.get_json("nope.json")
    with pytest.raises(ObjectNotFoundError):
        storage.size("nope")
    with pytest.raises(ObjectNotFoundError):
        storage.open("nope")
    storage.put_bytes("dir/file", b"x")
    # a "folder" is not an object
    assert not storage.exists("dir")
    with pytest.raises(ObjectNotFoundError):
        storage.get_bytes("dir")
    with pytest.raises(ObjectNotFoundError):
        storage.size("dir")


def test_exists_size_delete(storage):
    assert not storage.exists("k/v.txt")
    storage.put_bytes("k/v.txt", b"12345")
    assert storage.exists("k/v.txt")
    assert storage.size("k/v.txt") == 5
    storage.delete("k/v.txt")
    assert not storage.exists("k/v.txt")
    storage.delete("k/v.txt")  # missing is fine
    storage.delete("never/was")


def test_delete_prefix(storage):
    for k in ["d/1/a", "d/1/b/c", "d/2", "d10/x", "other"]:
        storage.put_bytes(k, b"x")
    assert storage.delete_prefix("d/1/") == 2
    assert storage.list() == ["d/2", "d10/x", "other"]
    # a prefix is a folder: "d" does not touch "d10/..."
    assert storage.delete_prefix("d") == 1
    assert storage.list() == ["d10/x", "other"]
    assert storage.delete_prefix("nothing/here/") == 0
    with pytest.raises(InvalidKeyError):
        storage.delete_prefix("")
    with pytest.raises(InvalidKeyError):
        storage.delete_prefix("../")


def test_list(storage):
    keys = ["b/2.png", "a/x/1.png", "a/x/0.png", "a/y.json", "top.txt", "ab.txt"]
    for k in keys:
        storage.put_bytes(k, b"data")
    assert storage.list() == sorted(keys)
    assert storage.list("a/") == ["a/x/0.png", "a/x/1.png", "a/y.json"]
    assert storage.list("a") == ["a/x/0.png", "a/x/1.png", "a/y.json", "ab.txt"]  # string prefix
    assert storage.list("a/x/1") == ["a/x/1.png"]
    assert storage.list("a/", recursive=False) == ["a/x/", "a/y.json"]
    assert storage.list("", recursive=False) == ["a/", "ab.txt", "b/", "top.txt"]
    assert storage.list("missing/") == []
    assert storage.list("missing/", recursive=False) == []
    with pytest.raises(InvalidKeyError):
        storage.list("../")


def test_list_hides_local_temp_files(tmp_path):
    s = Storage(str(tmp_path))
    s.put_bytes("a/real.bin", b"x")
    # an in-flight (or crashed) write leaves a temp file beside its target
    (tmp_path / "a" / ".tmp-abc123").write_bytes(b"partial")
    (tmp_path / ".tmp-top").write_bytes(b"partial")
    assert s.list() == ["a/real.bin"]
    assert s.list("a/", recursive=False) == ["a/real.bin"]


BAD_KEYS = [
    "",
    "../etc/passwd",
    "/etc/passwd",
    "a/../../b",
    "a/./b",
    ".",
    "..",
    "a//b",
    "a\\b",
    "a\x00b",
    "a/",
    "a/b\n",
    "x" * 1025,
    "a/.tmp-123",
    "a*b",
    "a?b",
    "a[0]",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys(storage, key):
    for call in (
        lambda: storage.full_path(key),
        lambda: storage.put_bytes(key, b"x"),
        lambda: storage.get_bytes(key),
        lambda: storage.exists(key),
        lambda: storage.delete(key),
        lambda: storage.presign(key),
        lambda: storage.open(key),
    ):
        with pytest.raises(InvalidKeyError) as info:
            call()
        assert isinstance(info.value, ValueError) and isinstance(info.value, StorageError)


def test_key_length_limit(storage):
    key = "k/" + "x" * 1022
    assert len(key) == 1024
    storage.full_path(key)  # exactly at the limit is accepted
    with pytest.raises(InvalidKeyError):
        storage.full_path(key + "x")
    with pytest.raises(InvalidKeyError):
        storage.put_bytes(None, b"x")  # type: ignore[arg-type]


def test_full_path_stays_under_root(tmp_path):
    s = Storage(str(tmp_path / "root"))
    assert s.full_path("a/b.png") == str(tmp_path / "root" / "a" / "b.png")


# -- presign ------------------------------------------------------------------------------


def test_presign(storage):
    storage.put_bytes("share/img.png", b"\x89PNG-fake-bytes")
    url = storage.presign("share/img.png", expires=120)
    if storage.protocol == "file":
        assert url is None
        return
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"\x89PNG-fake-bytes"
        assert resp.headers["Content-Type"] == "image/png"


# -- pickling -----------------------------------------------------------------------------


def test_pickle_round_trip(storage):
    storage.put_bytes("p/obj.bin", b"pickled")
    clone = pickle.loads(pickle.dumps(storage))
    assert clone == storage and clone is not storage
    assert clone.get_bytes("p/obj.bin") == b"pickled"
    clone.put_bytes("p/other.bin", b"from clone")
    assert storage.get_bytes("p/other.bin") == b"from clone"


def test_pickle_into_another_process(storage):
    storage.put_bytes("p/cross.bin", b"cross-process")
    code = (
        "import pickle, sys\n"
        "s = pickle.loads(sys.stdin.buffer.read())\n"
        "s.put_bytes('p/child.bin', s.get_bytes('p/cross.bin') + b'!')\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(storage),
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
        timeout=60,
    )
    assert storage.get_bytes("p/child.bin") == b"cross-process!"


def _child_read(storage, key, queue):  # runs in a forked child
    queue.put(storage.get_bytes(key))


def test_usable_after_fork(storage):
    import multiprocessing

    storage.put_bytes("p/fork.bin", b"forked")
    assert storage.get_bytes("p/fork.bin") == b"forked"  # the parent's fs is live
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(storage, "p/fork.bin", queue))
    proc.start()
    try:
        assert queue.get(timeout=30) == b"forked"
    finally:
        proc.join(30)
    assert proc.exitcode == 0


# -- atomicity ----------------------------------------------------------------------------


def _local_files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_local_failed_write_keeps_old_object(tmp_path, monkeypatch, fail_at):
    s = Storage(str(tmp_path))
    s.put_bytes("obj.bin", b"old complete payload")

    class Boom(Exception):
        pass

    def boom(*a, **k):
        raise Boom()

    if fail_at == "fsync":
        monkeypatch.setattr(os, "fsync", boom)
    elif fail_at == "replace":
        monkeypatch.setattr(os, "replace", boom)

    with pytest.raises(Boom):
        if fail_at == "write":
            s._local_atomic_write("obj.bin", lambda f: (f.write(b"half"), boom()))
        else:
            s.put_bytes("obj.bin", b"new payload")
    monkeypatch.undo()
    assert s.get_bytes("obj.bin") == b"old complete payload"
    assert s.list() == ["obj.bin"]
    assert _local_files(str(tmp_path)) == ["obj.bin"]  # the temp file was removed


def test_local_failed_put_file_keeps_old_object(tmp_path, monkeypatch):
    s = Storage(str(tmp_path / "root"))
    s.put_bytes("f.bin", b"old")
    src = tmp_path / "src.bin"
    src.write_bytes(b"n" * 100_000)
    import shutil

    def broken_copy(fsrc, fdst, length=0):
        fdst.write(fsrc.read(10))
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        s.put_file("f.bin", src)
    monkeypatch.undo()
    assert s.get_bytes("f.bin") == b"old"
    assert _local_files(s.root) == ["f.bin"]


def test_concurrent_readers_see_whole_objects(storage):
    a = b"A" * 200_000
    b = b"B" * 150_000 + b"b" * 50_001
    storage.put_bytes("race/obj.bin", a)
    done = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(50):
                storage.put_bytes("race/obj.bin", b if i % 2 == 0 else a)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    reads = 0
    try:
        while not done.is_set() or reads < 5:
            data = storage.get_bytes("race/obj.bin")
            assert data == a or data == b, f"torn read: {len(data)} bytes"
            reads += 1
    finally:
        t.join()
    assert not errors, errors
    assert storage.list("race/") == ["race/obj.bin"]


# -- keys ---------------------------------------------------------------------------------


def test_key_layout():
    when = datetime(2026, 11, 21, 23, 30, tzinfo=timezone.utc)
    assert K.output_key("job_abc", 0, when=when) == "outputs/2026/11/21/job_abc/0.png"
    assert K.output_key("req-1", 3, ".MP4", when=when) == "outputs/2026/11/21/req-1/3.mp4"
    assert K.output_key("x", 1).startswith("outputs/")
    assert K.job_key("job_1") == "jobs/job_1.json"
    assert K.job_cancel_key("job_1") == "jobs/job_1.cancel"
    assert K.lora_prefix("cats", "v2") == "models/loras/cats/v2/"
    assert K.lora_prefix("cats", 3) == "models/loras/cats/3/"
    assert K.dataset_prefix("ds1") == "datasets/ds1/"
    assert K.dataset_prefix("ds1", 4) == "datasets/ds1/v4/"


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "..", "a b", "é", "x" * 201, None])
def test_key_ids_validated(bad):
    with pytest.raises(ValueError):
        K.job_key(bad)
    with pytest.raises(ValueError):
        K.output_key(bad, 0)
    with pytest.raises(ValueError):
        K.lora_prefix(bad, "v1")
    with pytest.raises(ValueError):
        K.dataset_prefix(bad)


def test_key_args_validated():
    with pytest.raises(ValueError):
        K.output_key("ok", -1)
    with pytest.raises(ValueError):
        K.output_key("ok", 0, ext="p/ng")
    with pytest.raises(ValueError):
        K.dataset_prefix("ok", -2)
    with pytest.raises(ValueError):
        K.new_id("bad/prefix")


def test_new_id_is_time_sortable_and_unique():
    ids = [K.new_id("job") for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.startswith("job_") and len(i) == 4 + 20 for i in ids)
    int(ids[0][4:], 16)
