"""Issue 20 in the browser: collect → dataset → inline caption edit → remove, in Debian's Chromium.

No Ray here: the API app is built as the ingress builds it (tests/keyed_app.py) and served by
uvicorn on loopback, the sources are the loopback stand-in (tests/source_standin.py), and a
thread plays the job runner: it runs each queued job's pipeline with the runner's JobContext, so
the page follows real job records through /v1/jobs/{id}/events. Training from the UI is covered
by test_web_ui.py against the real app.
"""

from __future__ import annotations

import csv
import io
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from graphs.job_runner import JobContext
from graphs.registry import JOB_PIPELINES
from storage.jobs import JobError
from tests.keyed_app import keyed_app
from tests.serve.helpers import browse_dataset
from tests.source_standin import PEXELS_KEY, UNSPLASH_KEY, StandIn

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
KEY = "ui-collect-key"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_jobs(built, stop: threading.Event) -> None:
    """The job runner's part: each job the API queued runs its pipeline, and ends completed."""
    store, done = built.services.jobs.jobs, set()
    while not stop.is_set():
        for job_id in [j for j in built.queue.sent if j not in done]:
            done.add(job_id)
            ctx = JobContext(store, store.get(job_id))
            ctx.save(status="in_progress", started_at=time.time())
            try:
                JOB_PIPELINES[ctx.record.kind](ctx, {})
                ctx.save(status="completed", progress=100.0, finished_at=time.time())
            except Exception as exc:  # shown by the page as a failed import
                ctx.save(status="failed", finished_at=time.time(),
                         error=JobError(type=type(exc).__name__, message=str(exc)))
        stop.wait(0.1)


@pytest.fixture()
def served(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_UNSPLASH_KEY", UNSPLASH_KEY)
    monkeypatch.setenv("TEST_PEXELS_KEY", PEXELS_KEY)
    with StandIn() as standin:
        built = keyed_app(tmp_path / "storage", {"ui": (KEY, ["train"])}, standin.ingress())
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(built.client.app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        stop = threading.Event()
        runner = threading.Thread(target=run_jobs, args=(built, stop), daemon=True)
        runner.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield built, f"http://127.0.0.1:{port}", standin
        finally:
            stop.set()
            server.should_exit = True
            thread.join(10)


def test_collect_then_edit_captions_inline(browser, served):
    built, base_url, standin = served
    # bypass_csp: Playwright's wait_for_function predicates run through eval (see test_web_ui.py);
    # the stand-in's thumbnails are plain http on loopback, which the CSP's img-src would block
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=base_url, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto("/")
        page.fill("#api-key", KEY)
        page.click("#api-key-save")

        # 1. search both sources, see results with their credits
        page.goto("/#/collect")
        page.wait_for_selector("#co-src-unsplash:checked")
        page.wait_for_selector("#co-src-pexels:checked")
        page.fill("#co-query", "beach")
        page.fill("#co-per-page", "4")
        page.click("#co-search")
        page.wait_for_selector("#co-results li:nth-child(8)")
        assert page.locator("#co-results li").count() == 8
        assert "Ann Example" in page.inner_text("#co-results li:first-child")
        assert "Bo Example" in page.inner_text("#co-results li:last-child")
        assert "requests left" in page.inner_text("#co-rate")
        # the colour filter offers what every checked source knows: teal is Unsplash's alone
        colours = lambda: page.eval_on_selector_all("#co-colour option", "os => os.map(o => o.value)")  # noqa: E731
        assert "red" in colours() and "teal" not in colours()
        page.uncheck("#co-src-pexels")
        assert "teal" in colours()
        page.check("#co-src-pexels")
        assert "teal" not in colours()

        # 2. pick two, import into a new dataset, follow the job to its end
        page.check("[data-result='unsplash:u1']")
        page.check("[data-result='pexels:1']")
        page.fill("#co-new-dataset", "ui-beaches")
        page.fill("#co-tags", "beach, sand")
        page.click("#co-import")
        page.wait_for_function("document.querySelector('#co-progress')?.innerText.startsWith('Imported')")
        assert page.inner_text("#co-progress").startswith("Imported 2 images into version 1")
        dataset_id = page.eval_on_selector("#co-dataset", "s => s.value")
        store = built.services.datasets.store
        assert store.manifest(dataset_id).num_rows == 2
        assert "u1" in standin.pings  # the Unsplash download was counted
        assert page.locator("#co-rejections").is_hidden()

        # 3. the dataset page: its images with credits; edit a caption inline, then remove an image
        page.goto("/#/datasets")
        browse_dataset(page, dataset_id, 2)
        assert "Photo by" in page.inner_text("#ds-images")
        caption = page.locator("#ds-images textarea").first
        image_id = caption.get_attribute("data-image")
        caption.fill("a caption edited inline")
        caption.press("Tab")  # change fires on leaving the field
        page.wait_for_function("document.querySelector('#ds-browser-status')?.innerText.startsWith('Caption saved')")
        assert "version 2 has 2 images" in page.inner_text("#ds-browser-status")
        v2 = {r["sha256"]: r for r in store.manifest(dataset_id, 2).to_pylist()}
        assert v2[image_id]["caption"] == "a caption edited inline"
        v1 = {r["sha256"]: r for r in store.manifest(dataset_id, 1).to_pylist()}
        assert v1[image_id]["caption"] != "a caption edited inline"  # version 1 keeps its caption

        page.click(f"button[data-remove='{image_id}']")
        page.wait_for_function("document.querySelector('#ds-browser-status')?.innerText.startsWith('Image removed')")
        assert "version 3 has 1 image" in page.inner_text("#ds-browser-status")
        assert page.locator("#ds-images li").count() == 1
        assert store.versions(dataset_id) == [1, 2, 3] and store.manifest(dataset_id, 1).num_rows == 2

        # 4. the credits of the version shown, downloaded as CSV: one row per image left, with its photographer
        with page.expect_download() as download:
            page.click("#ds-credits")
        assert download.value.suggested_filename == f"{dataset_id}-v3-credits.csv"
        rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        left = store.manifest(dataset_id, 3).to_pylist()[0]
        assert len(rows) == 1 and json.loads(left["attribution"])["photographer"] in rows[0].values(), rows

        # 5. a result whose image is gone: the import lands the rest and names it with why
        page.goto("/#/collect")
        page.wait_for_selector(f"#co-dataset option[value='{dataset_id}']", state="attached")
        page.select_option("#co-dataset", dataset_id)
        page.fill("#co-query", "troubled")
        page.fill("#co-per-page", "10")
        page.click("#co-search")
        page.wait_for_selector("[data-result='unsplash:gone']")
        page.check("[data-result='unsplash:gone']")
        page.check("[data-result='unsplash:u2']")
        page.click("#co-import")
        page.wait_for_function("document.querySelector('#co-progress')?.innerText.includes('into version 4')")
        assert page.inner_text("#co-progress").startswith("Imported 1 image into version 4")
        assert "1 rejected" in page.inner_text("#co-progress")
        rejected = page.inner_text("#co-rejections")
        assert page.locator("#co-rejections li").count() == 1 and "unsplash:gone" in rejected and "404" in rejected
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "collect_flow.png"), full_page=True)
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
