"""Issue 18, the storage side: each finding's test, which failed before its fix.

* 2: a prefix import reads only configured import roots, never Atelier's own data;
* 3: a URL import ends at its deadline whatever the server does, and a cancel stops it mid-read;
* 7: an image's pixel count is checked from its header before it is decoded (uploads, zip
  members, URL imports), and decodes share one pixel budget;
* 11: a job being deleted can tell whether another job (a replay) still names its input;
* 12: local import roots do not follow links out of the root; 6to4, Teredo, site-local and
  NAT64 IPv6 addresses are not public.
"""

from __future__ import annotations

import io
import os
import socketserver
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from PIL import ImageFile

import storage.datasets as datasets_module
from storage.datasets import DatasetStore, ImageItem, InvalidDatasetInputError, check_prefix_allowed
from storage.fs import Storage
from storage.jobs import JobRecord, JobStore
from storage.keys import new_id
from storage.url_import import DEFAULT_MAX_PIXELS, DatasetImportConfig, UrlRefusedError, fetch_url, resolve_allowed
from tests.media import noise_image

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


# --- finding 7: decompression bombs ---------------------------------------------------------------


def bomb_png(width: int = 8192, height: int = 8192) -> bytes:
    """A black RGB PNG of ``width x height``, built row by row (the image itself never exists
    in memory): about 200 KB that a decoder inflates to 256 MB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * width)  # filter byte, then RGB
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = bomb_png()
    assert len(data) < 300_000
    return data


BOMB_REASON = f"image is 8192x8192, over the limit of {4096 * 4096} pixels"


@pytest.fixture()
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the images PIL fully decodes (``ImageFile.load``) during the test."""
    sizes: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_the_default_pixel_limit_is_the_ingress_upload_limit():
    assert DEFAULT_MAX_PIXELS == 4096 * 4096 == DatasetImportConfig().max_pixels


def test_a_pixel_bomb_is_refused_from_its_header_before_decoding(tmp_path, bomb, decoded):
    store = DatasetStore(Storage(str(tmp_path / "root")))  # the default limit
    dataset_id = store.create("bombs").id
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("set/inner.png", bomb + b"zip")  # other bytes: not a duplicate of bomb.png
    result = store.add_files(dataset_id, [("bomb.png", bomb), ("set.zip", archive.getvalue()),
                                          ("fine.png", noise_image(16, 16, 1))])
    assert result.added == 1
    assert sorted((r.filename, r.reason) for r in result.rejected) == [
        ("bomb.png", BOMB_REASON), ("set/inner.png", BOMB_REASON)]
    assert decoded and set(decoded) == {(16, 16)}  # the bombs' headers were read, never their pixels


def test_peak_memory_stays_low_when_many_bombs_are_uploaded(tmp_path, bomb):
    """In a fresh interpreter, so its peak RSS measures this upload alone (PIL's pixel buffers
    are not Python allocations: tracemalloc would not see them)."""
    (tmp_path / "bomb.png").write_bytes(bomb)
    script = textwrap.dedent("""
        import resource, sys
        from storage.datasets import DatasetStore
        from storage.fs import Storage

        bomb = open(sys.argv[1], "rb").read()
        store = DatasetStore(Storage(sys.argv[2]))
        dataset_id = store.create("bombs").id
        store.add_files(dataset_id, [("warm.png", open(sys.argv[3], "rb").read())])  # imports, pools: warm
        files = [(f"b{i}.png", bomb + bytes([i])) for i in range(6)]  # distinct bytes, no duplicates
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = store.add_files(dataset_id, files)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
        print(result.added, len(result.rejected), grown // 1024)
    """)
    (tmp_path / "warm.png").write_bytes(noise_image(64, 64, 1))
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "bomb.png"), str(tmp_path / "root"),
                           str(tmp_path / "warm.png")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    added, rejected, grown_mib = map(int, done.stdout.split())
    assert (added, rejected) == (0, 6)
    assert grown_mib < 32, f"peak RSS grew {grown_mib} MiB for 6 refused bombs (one decode is 256 MiB)"


def test_decodes_share_one_pixel_budget(tmp_path, monkeypatch):
    active, peak = 0, 0
    lock = threading.Lock()
    real_load = ImageFile.ImageFile.load

    def load(self):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        try:
            return real_load(self)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(datasets_module, "DECODE_BUDGET", datasets_module._PixelBudget(2 * 64 * 64))
    store = DatasetStore(Storage(str(tmp_path / "root")))
    dataset_id = store.create("budget").id
    result = store.add_images(dataset_id, [ImageItem(f"{i}.png", noise_image(64, 64, i)) for i in range(8)])
    assert result.added == 8
    assert peak == 2  # 8 writer threads, room for two 64x64 decodes at a time


# --- finding 2: prefix imports read only configured import roots ---------------------------------


ATELIER_PREFIXES = ["uploads/", "outputs/", "datasets/", "jobs/", "training/", "workflows/", "fine_tuning/",
                    "models/", "u", "up", "d", "datasets/_names/"]


@pytest.mark.parametrize("prefix", ATELIER_PREFIXES)
def test_a_prefix_import_of_atelier_data_is_refused_even_if_configured(prefix):
    with pytest.raises(InvalidDatasetInputError) as err:
        check_prefix_allowed(prefix, allowed_prefixes=[prefix, "imports/", "/"])
    assert err.value.param == "prefix"
    assert "Atelier's own storage" in err.value.message


def test_a_prefix_import_cannot_copy_another_jobs_private_upload(storage):
    """The issue's repro: a `train` key imports {"prefix": "uploads/"} into its own dataset, to
    download another job's input. The job refuses it however the roots are configured, and so
    does the store for any caller; by absolute path or URL into the storage root too."""
    from graphs.dataset_jobs import dataset_import
    from graphs.job_runner import JobContext

    storage.put_bytes("uploads/upload_1/image", noise_image(16, 16, 42), content_type="image/png")
    store = DatasetStore(storage)
    dataset_id = store.create("mine").id
    jobs = JobStore(storage)
    root = storage.root  # /tmp/.../root or s3://bucket/prefix-...
    parent = root.rsplit("/", 1)[0]
    for prefix in ("uploads/", "u", f"{root}/uploads/", f"{root}/", f"{parent}/"):
        config = {"allowed_prefixes": [prefix, f"{parent}/", "uploads/"]}  # all configured, all refused
        record = jobs.create("datasets.import", {"dataset_id": dataset_id, "prefix": prefix, "config": config})
        with pytest.raises(Exception) as err:
            dataset_import(JobContext(jobs, record), {})
        assert getattr(err.value, "param", None) == "prefix", (prefix, err.value)
        with pytest.raises(InvalidDatasetInputError):
            store.add_from_prefix(dataset_id, prefix)
    assert store.versions(dataset_id) == []


def test_configured_import_roots_still_import(storage, tmp_path):
    storage.put_bytes("imports/batch/a.png", noise_image(16, 16, 1))
    assert check_prefix_allowed("imports/batch/", ["imports/"], storage_root=storage.root) == "imports/batch/"
    assert check_prefix_allowed("imports/batch/", ["imports/batch"]) == "imports/batch/"
    for allowed in ([], ["imports/other/"], ["/data/"]):  # nothing is importable until configured
        with pytest.raises(InvalidDatasetInputError, match="not under a configured import root"):
            check_prefix_allowed("imports/batch/", allowed, storage_root=storage.root)
    # the storage root's imports/ by path or URL, and a place outside the root
    inside = f"{storage.root}/imports/batch/"
    allowed = check_prefix_allowed(inside, [f"{storage.root}/imports/"], storage_root=storage.root)
    assert allowed.rstrip("/") == (os.path.realpath(inside) if storage.protocol == "file" else inside).rstrip("/")
    outside = tmp_path / "photos"
    outside.mkdir()
    assert check_prefix_allowed(str(outside), [str(tmp_path)], storage_root=storage.root) == os.path.realpath(outside)
    store = DatasetStore(storage)
    dataset_id = store.create("imported").id
    assert store.add_from_prefix(dataset_id, "imports/batch/").added == 1


@pytest.mark.parametrize("prefix", ["s3a://bucket/root/uploads/", "S3://bucket/root/jobs/", "s3://bucket/",
                                    "simplecache::s3://bucket/root/uploads/"])
def test_other_spellings_of_the_storage_root_are_refused(prefix):
    with pytest.raises(InvalidDatasetInputError):
        check_prefix_allowed(prefix, ["s3://bucket/", "s3a://bucket/", "simplecache::s3://bucket/"],
                             storage_root="s3://bucket/root")


def test_local_spellings_of_the_storage_root_are_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    for prefix in (f"local://{root}/uploads/", f"file://{root}/outputs/", f"{tmp_path}/alias/jobs/", str(tmp_path)):
        with pytest.raises(InvalidDatasetInputError):
            check_prefix_allowed(prefix, [str(tmp_path), f"local://{tmp_path}", f"file://{tmp_path}"],
                                 storage_root=str(root))


# --- finding 12: links out of a local import root; IPv6 ranges that are not public ----------------


def test_local_import_roots_do_not_follow_links_out_of_the_root(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(noise_image(16, 16, 7))
    (outside / "b.png").write_bytes(noise_image(16, 16, 8))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(noise_image(16, 16, 1))
    (folder / "secret-link.png").symlink_to(outside / "secret.png")
    (folder / "linked-folder").symlink_to(outside, target_is_directory=True)
    store = DatasetStore(Storage(str(tmp_path / "root")))
    dataset_id = store.create("photos").id
    prefix = check_prefix_allowed(str(folder), [str(folder)], storage_root=store.storage.root)
    result = store.add_from_prefix(dataset_id, prefix)
    assert result.added == 1
    assert [(r.filename, r.reason) for r in result.rejected] == [
        ("secret-link.png", "cannot read: the file is a link to outside the import folder")]
    assert store.manifest(dataset_id).column("filename").to_pylist() == ["a.png"]


def test_a_link_under_imports_cannot_reach_the_rest_of_a_local_root(tmp_path):
    storage = Storage(str(tmp_path / "root"))
    storage.put_bytes("uploads/upload_1/image", noise_image(16, 16, 9))
    storage.put_bytes("imports/x/a.png", noise_image(16, 16, 1))
    os.symlink(storage.full_path("uploads/upload_1/image"), storage.full_path("imports/x/link.png"))
    store = DatasetStore(storage)
    dataset_id = store.create("x").id
    result = store.add_from_prefix(dataset_id, "imports/x/")
    assert result.added == 1 and [r.filename for r in result.rejected] == ["imports/x/link.png"]


def test_a_fifo_in_an_import_folder_is_rejected_not_waited_on(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(noise_image(16, 16, 1))
    os.mkfifo(folder / "pipe.png")
    store = DatasetStore(Storage(str(tmp_path / "root")))
    dataset_id = store.create("fifo").id
    results = []
    worker = threading.Thread(target=lambda: results.append(store.add_from_prefix(dataset_id, str(folder))),
                              daemon=True)
    worker.start()
    worker.join(10)
    assert results, "the import blocked opening a FIFO"
    assert results[0].added == 1 and [r.filename for r in results[0].rejected] == ["pipe.png"]


@pytest.mark.parametrize("address", [
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "2002:808:808::1",  # 6to4 of a public address: still a relay, not a host
    "fec0::1", "feff::1",  # site-local
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::808:808",  # NAT64 of a public address: still a translator, not a host
    "64:ff9b:1::a00:1",  # local-use NAT64
    "2001::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
])
def test_ipv6_forms_that_reach_private_or_relayed_addresses_are_not_public(address):
    with pytest.raises(UrlRefusedError, match="non-public"):
        resolve_allowed(address, 80, [])


@pytest.mark.parametrize("address", ["2606:4700:4700::1111", "8.8.8.8"])
def test_public_addresses_stay_public(address):
    assert resolve_allowed(address, 80, []) == [address]


# --- finding 3: URL imports end at their deadline, and stop mid-read ----------------------------


class _Slow(socketserver.BaseRequestHandler):
    """Answers as `server.mode` says: 'body' sends the headers, then the body a byte every
    0.2 s; 'headers' sends the headers themselves a byte every 0.2 s; 'silent' sends nothing.
    At most 60 bytes (12 s) trickle, then the connection closes."""

    def handle(self):
        server = self.server
        self.request.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
        try:
            if server.mode == "silent":
                server.release.wait(12)
                return
            if server.mode == "body":
                self.request.sendall(head)
                data = b"\x89PNG" + b"\0" * 996
            else:
                data = head
            for i in range(60):
                if server.release.wait(0.2):
                    return
                self.request.sendall(data[i:i + 1])
        except OSError:
            pass  # the client hung up: as it should


@pytest.fixture(scope="module")
def slow_server():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    server.mode = "body"
    server.release = threading.Event()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/slow.png"


SLOW = DatasetImportConfig(allow_private_hosts=["127.0.0.1"], timeout_s=1.0)


@pytest.mark.parametrize("mode", ["body", "headers", "silent"])
def test_a_url_import_ends_at_its_deadline_whatever_the_server_does(slow_server, mode):
    slow_server.mode = mode
    started = time.monotonic()
    result = fetch_url(_url(slow_server), SLOW)
    elapsed = time.monotonic() - started
    assert (result.status, result.reason) == ("failed", "timed out after 1.0 s")
    assert elapsed < 1.5, f"{mode}: returned after {elapsed:.1f} s with a 1 s limit"


def test_stop_ends_a_fetch_mid_read(slow_server):
    slow_server.mode = "body"
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    result = fetch_url(_url(slow_server), SLOW.model_copy(update={"timeout_s": 30}), stop=stop)
    assert (result.status, result.reason) == ("failed", "stopped")
    assert time.monotonic() - started < 1.0


def test_cancelling_a_url_import_job_stops_its_slow_fetches(slow_server, tmp_path):
    from deployments.errors import JobCancelledError
    from graphs.dataset_jobs import dataset_import
    from graphs.job_runner import JobContext

    slow_server.mode = "body"
    storage = Storage(str(tmp_path / "root"))
    store = DatasetStore(storage)
    dataset_id = store.create("slow").id
    jobs = JobStore(storage)
    config = SLOW.model_copy(update={"timeout_s": 30}).model_dump()
    record = jobs.create("datasets.import", {"dataset_id": dataset_id, "urls": [_url(slow_server)] * 2,
                                             "config": config})
    record = jobs.save(record.model_copy(update={"status": "in_progress"}))
    threading.Timer(0.5, jobs.request_cancel, [record.id]).start()
    started = time.monotonic()
    with pytest.raises(JobCancelledError):
        dataset_import(JobContext(jobs, record), {})
    assert time.monotonic() - started < 1.5
    assert store.versions(dataset_id) == []


def test_a_url_import_refuses_a_pixel_bomb_from_its_header(bomb):
    import http.server

    class Bomb(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bomb)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        config = DatasetImportConfig(allow_private_hosts=["127.0.0.1"], max_bytes=MiB)
        result = fetch_url(f"http://127.0.0.1:{httpd.server_address[1]}/bomb.png", config)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (result.status, result.reason) == ("refused", BOMB_REASON)


# --- finding 11: a shared input stays while another job names it --------------------------------


def test_jobs_referencing_a_shared_input(tmp_path):
    jobs = JobStore(Storage(str(tmp_path / "root")))
    upload = f"uploads/{new_id('upload')}/image"
    original = jobs.create("videos.image_to_video", {"svd": {"image_key": upload}})
    replay = jobs.create("videos.image_to_video", {"svd": {"image_key": upload}, "replay_of": original.id})
    jobs.create("images.generations", {"sdxl": {"prompt": f"{upload} is not the key itself"}})
    assert jobs.referencing(upload, exclude=[original.id]) == [replay.id]
    assert jobs.referencing(upload, exclude=[replay.id]) == [original.id]
    assert jobs.referencing(upload) == [replay.id, original.id]  # newest first
    # a job made long before the upload cannot name it, so its record is not even read
    old = JobRecord(id="job_000000000001" + "00000000", kind="videos.image_to_video",
                    request={"svd": {"image_key": upload}}, created_at=1.0, updated_at=1.0)
    jobs.save(old)
    assert jobs.referencing(upload, exclude=[original.id]) == [replay.id]
    assert jobs.referencing("uploads/no-id-here/image", exclude=[]) == []
    jobs.delete(replay.id)
    assert jobs.referencing(upload, exclude=[original.id]) == []


def test_deleting_a_video_keeps_the_input_its_replay_shares(tmp_path):
    from deployments.sdxl.contract import SDXLConfig, SDXLLimits
    from deployments.svd.contract import SVDConfig, SVDLimits
    from deployments.upscaler.contract import UpscalerConfig, UpscalerLimits
    from tests.unit.test_videos_service import build, png, run, video

    limits = {
        "sdxl": SDXLLimits.from_config(SDXLConfig(model="tiny-sdxl"), styles={}),
        "svd": SVDLimits.from_config(SVDConfig(model="tiny-svd", default_width=64, default_height=64,
                                               max_num_frames=14)),
        "upscaler": UpscalerLimits.from_config(UpscalerConfig(model="tiny-up", max_input_size=512), scale=4,
                                               max_noise_level=350),
    }
    app = build(tmp_path, limits)
    view = run(video(app, png(64, 64), prompt="a fox", size="64x64", seed=3))
    record = app.store.update(view.id, status="completed")
    source = record.request["svd"]["image_key"]
    replay = app.store.create(record.kind, {**record.request, "replay_of": record.id}, list(record.stages))
    app.store.update(replay.id, status="completed")
    assert run(app.videos.delete(view.id)).deleted
    assert app.storage.exists(source), "the replay's input went with the original video"
    assert run(app.videos.delete(replay.id)).deleted
    assert not app.storage.exists(source)  # the last video that named it took it along


def test_a_workflow_version_saved_while_the_workflow_is_deleted_does_not_bring_it_back(tmp_path):
    """Issue 18, finding 12 (races): a save of version N+1 racing a delete. The delete removes every
    version it listed; the save's new file, written after, used to leave a workflow with only that
    version. Now the save sees version 1 gone, removes its own file and says the workflow is gone."""
    from storage.fs import Storage
    from storage.workflows import SavedWorkflow, SavedWorkflowNotFoundError, SavedWorkflowStore

    store = SavedWorkflowStore(Storage(str(tmp_path / "root")))

    def version(n: int) -> SavedWorkflow:
        return SavedWorkflow(id="wf_1", name="w", description="", version=n, created_at=0, workflow={"nodes": []})

    store.create(version(1))
    store.create(version(2))
    store.delete("wf_1")  # the delete lands while version 3 is being saved
    with pytest.raises(SavedWorkflowNotFoundError):
        store.create(version(3))
    assert store.versions("wf_1") == []
    assert store.list_latest(10) == []
