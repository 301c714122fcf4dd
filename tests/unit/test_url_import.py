"""storage.url_import against a local http.server, and URL import into a dataset."""

from __future__ import annotations

import http.server
import threading
import time

import pytest

from storage.datasets import DatasetStore
from storage.url_import import DatasetImportConfig, UrlRefusedError, check_url, fetch_url, fetch_urls, resolve_allowed
from tests.media import noise_image

LIMIT = 64 * 1024


def png(seed: int, size: int = 16) -> bytes:
    return noise_image(size, size, seed)


class Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    # /slow/<n>.png counts the requests in flight at once; each waits (up to a second) for
    # `slow_target` to be in flight, so a bounded client reaches its bound even on a busy machine
    slow = threading.Condition()
    slow_in_flight = 0
    slow_max_in_flight = 0
    slow_target = 0

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/slow/"):
            self._count_in_flight()
        status, headers, body = self.routes.get(self.path, (404, {}, b"missing"))
        self.send_response(status)
        for name, value in headers.items():
            if not name.startswith("_"):
                self.send_header(name, value)
        if "Content-Length" not in headers and not headers.get("_chunked"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client aborted an oversized body, as it should

    def _count_in_flight(self):
        cls = type(self)
        with cls.slow:
            cls.slow_in_flight += 1
            cls.slow_max_in_flight = max(cls.slow_max_in_flight, cls.slow_in_flight)
            cls.slow.notify_all()
            cls.slow.wait_for(lambda: cls.slow_in_flight >= cls.slow_target, timeout=1.0)
        time.sleep(0.05)  # still in flight while the others arrive
        with cls.slow:
            cls.slow_in_flight -= 1

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.routes = {
        "/a.png": (200, {"Content-Type": "image/png"}, png(1)),
        "/b.png": (200, {"Content-Type": "application/octet-stream"}, png(2)),
        "/hop": (302, {"Location": "/a.png"}, b""),
        "/to-private": (302, {"Location": "http://10.255.255.1/a.png"}, b""),
        "/to-metadata": (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
        "/big.png": (200, {"Content-Type": "image/png"}, b"\x89PNG" + b"\0" * (LIMIT * 2)),
        # no Content-Length: HTTP/1.0 body until close, so only streaming can stop it
        "/big-stream.png": (200, {"Content-Type": "image/png", "_chunked": "1"}, b"\x89PNG" + b"\0" * (LIMIT * 4)),
        "/page.html": (200, {"Content-Type": "text/html"}, b"<html>hello</html>"),
        "/fake.png": (200, {"Content-Type": "image/png"}, b"this is not a png at all"),
        "/gone.png": (404, {}, b"nope"),
        **{f"/slow/{i}.png": (200, {"Content-Type": "image/png"}, png(100 + i)) for i in range(12)},
    }
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield base
    httpd.shutdown()
    httpd.server_close()


ALLOW = DatasetImportConfig(allow_private_hosts=["127.0.0.1"], max_bytes=LIMIT, timeout_s=5, concurrency=4)
STRICT = DatasetImportConfig(max_bytes=LIMIT, timeout_s=5)


def test_allow_listed_loopback_works(server):
    result = fetch_url(f"{server}/a.png", ALLOW)
    assert result.ok and result.data == png(1) and result.content_type == "image/png"
    generic = fetch_url(f"{server}/b.png", ALLOW)  # octet-stream, but the bytes are an image
    assert generic.ok and generic.data == png(2)
    hop = fetch_url(f"{server}/hop", ALLOW)
    assert hop.ok and hop.data == png(1) and hop.final_url == f"{server}/a.png"


def test_allow_list_by_cidr(server):
    config = DatasetImportConfig(allow_private_hosts=["127.0.0.0/8"], max_bytes=LIMIT)
    assert fetch_url(f"{server}/a.png", config).ok


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/a.png", "file:///etc/passwd", "gopher://127.0.0.1/",
                                 "javascript:alert(1)", "/relative.png", "", "http://user:pw@127.0.0.1/a.png"])
def test_non_http_schemes_and_odd_urls_are_refused(url):
    result = fetch_url(url, ALLOW)
    assert result.status == "refused" and result.reason


def test_loopback_refused_unless_allowed(server):
    result = fetch_url(f"{server}/a.png", STRICT)
    assert result.status == "refused" and "non-public" in result.reason
    port = server.rsplit(":", 1)[1]
    for url in (f"http://localhost:{port}/a.png", f"http://[::1]:{port}/a.png", f"http://0.0.0.0:{port}/a.png",
                f"http://[::ffff:127.0.0.1]:{port}/a.png", f"http://2130706433:{port}/a.png"):
        refused = fetch_url(url, STRICT)
        assert refused.status == "refused", url


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.1", "172.16.0.1", "169.254.169.254", "224.0.0.1",
                                     "100.64.0.1", "240.0.0.1", "fe80::1", "fc00::1"])
def test_private_link_local_multicast_reserved_refused(address):
    with pytest.raises(UrlRefusedError):
        resolve_allowed(address, 80, [])


def test_redirect_to_refused_address_is_refused(server):
    for path in ("/to-private", "/to-metadata", "/to-file"):
        result = fetch_url(f"{server}{path}", ALLOW)
        assert result.status == "refused", path
    looping = fetch_url(f"{server}/loop", ALLOW)
    assert looping.status == "refused" and "redirects" in looping.reason


def test_oversize_response_is_refused(server):
    declared = fetch_url(f"{server}/big.png", ALLOW)
    assert declared.status == "refused" and "limit" in declared.reason
    streamed = fetch_url(f"{server}/big-stream.png", ALLOW)
    assert streamed.status == "refused" and "limit" in streamed.reason and streamed.data is None


def test_non_image_is_refused(server):
    html = fetch_url(f"{server}/page.html", ALLOW)
    assert html.status == "refused" and "text/html" in html.reason
    fake = fetch_url(f"{server}/fake.png", ALLOW)
    assert fake.status == "refused" and "not an image" in fake.reason
    gone = fetch_url(f"{server}/gone.png", ALLOW)
    assert gone.status == "failed" and "404" in gone.reason


def test_check_url():
    assert check_url("https://example.com/x.png") == ("https", "example.com", 443)
    assert check_url("http://example.com:8080/x") == ("http", "example.com", 8080)
    with pytest.raises(UrlRefusedError):
        check_url("http://example.com:99999/x")


def test_fetch_urls_in_order_with_bounded_concurrency(server):
    urls = [f"{server}/a.png", f"{server}/page.html", f"{server}/b.png", "ftp://x/y"] * 3
    seen = []
    results = fetch_urls(urls, ALLOW, on_result=lambda i, r: seen.append(i))
    assert [r.url for r in results] == urls
    assert [r.ok for r in results] == [True, False, True, False] * 3
    assert sorted(seen) == list(range(len(urls)))
    with pytest.raises(UrlRefusedError):
        fetch_urls(urls, ALLOW.model_copy(update={"max_urls": 3}))

    slow = [f"{server}/slow/{i}.png" for i in range(12)]
    for bound in (ALLOW.concurrency, 1):
        Handler.slow_max_in_flight, Handler.slow_target = 0, bound
        fetched = fetch_urls(slow, ALLOW.model_copy(update={"concurrency": bound}))
        assert [r.data for r in fetched] == [png(100 + i) for i in range(12)]
        assert Handler.slow_max_in_flight == bound


def test_url_import_into_dataset(server, storage):
    store = DatasetStore(storage)
    dataset_id = store.create("web").id
    progress = []
    result = store.add_from_urls(
        dataset_id, [f"{server}/a.png", f"{server}/b.png", f"{server}/hop", f"{server}/to-private"],
        ALLOW.model_copy(update={"concurrency": 1}),  # in order, so /hop is the duplicate
        captions={f"{server}/a.png": "from the web"}, progress=lambda done, total: progress.append((done, total)))
    assert (result.added, result.duplicates) == (2, [f"{server}/hop"])  # /hop serves a.png again
    assert [r.filename for r in result.rejected] == [f"{server}/to-private"]
    assert result.rejected[0].reason.startswith("refused")
    assert progress[-1] == (4, 4)
    rows = {r["source"]: r for r in store.manifest(dataset_id).to_pylist()}
    assert rows[f"{server}/a.png"]["caption"] == "from the web"


def test_import_job_fetches_urls_with_the_recorded_allow_list(server, storage):
    from graphs.job_runner import JobContext
    from graphs.dataset_jobs import dataset_import
    from storage.jobs import JobStore

    store = DatasetStore(storage)
    dataset_id = store.create("jobbed").id
    jobs = JobStore(storage)
    urls = [f"{server}/a.png", f"{server}/b.png", f"{server}/page.html"]
    refused = jobs.create("datasets.import", {"dataset_id": dataset_id, "urls": urls, "config": STRICT.model_dump()})
    ctx = JobContext(jobs, refused)
    dataset_import(ctx, {})  # loopback not allowed: every URL refused, reported, no version
    assert (ctx.record.result["added"], ctx.record.result["rejected"]) == (0, 3)
    assert store.versions(dataset_id) == []

    allowed = jobs.create("datasets.import", {"dataset_id": dataset_id, "urls": urls, "config": ALLOW.model_dump()})
    ctx = JobContext(jobs, allowed)
    dataset_import(ctx, {})
    assert (ctx.record.result["added"], ctx.record.result["rejected"], ctx.record.result["version"]) == (2, 1, 1)
    assert ctx.record.result["rejections"][0]["filename"] == f"{server}/page.html"
    assert (ctx.record.step, ctx.record.total_steps) == (3, 3)
