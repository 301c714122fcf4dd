"""Issue 19, item 2: dataset captions.

- `test_captions_for_real_through_ray_data_llm`: the running app (configs/local.yaml, the tiny
  random-weight Gemma 3) captions a sample dataset through Ray Data LLM against its own
  GemmaDeployment; a new version has a caption for every image, user captions are kept, the
  trigger word leads each new one, the old version is untouched. Then a cancel commits nothing.
- `test_caption_button_in_the_browser`: the dataset page's Caption button, in Debian's Chromium. As
  in test_collect_ui.py, no Ray: the API app is served by uvicorn on loopback and a thread plays
  the job runner, with a captioner of known answers, so the page follows real job records.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvicorn

from deployments.llm.contract import GemmaLimits
from graphs.captioning import CaptionOutcome
from graphs.job_runner import JobContext
from graphs.registry import JOB_PIPELINES
from storage.jobs import JobError
from storage.sample_dataset import TRIGGER, sample_items
from tests.keyed_app import keyed_app
from tests.serve.helpers import browse_dataset, wait_for_job

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
KEY = "ui-captions-key"


def upload_sample(client, dataset_id: str, count: int, with_captions: int, headers: dict | None = None) -> list:
    """`count` sample shapes; the first `with_captions` keep their captions (as the user's), the rest none."""
    files, captions = [], {}
    for index, item in enumerate(sample_items(count)):
        files.append(("files", (item.filename, item.data, "image/png")))
        if index < with_captions:
            captions[item.filename] = item.caption
    response = client.post(f"/v1/datasets/{dataset_id}/images", files=files, headers=headers or {},
                           data={"captions": json.dumps(captions)})
    assert response.status_code == 200, response.text
    assert response.json()["added"] == count
    return sample_items(count)


# --- the real thing: Ray Data LLM against the app's tiny Gemma 3 ----------------------------------


def test_captions_for_real_through_ray_data_llm(client):
    made = client.post("/v1/datasets", json={"name": f"shapes-{uuid.uuid4().hex[:8]}", "trigger_word": "sks"})
    assert made.status_code == 201, made.text
    dataset = made.json()["id"]
    items = upload_sample(client, dataset, 6, with_captions=2)
    user = {item.filename: item.caption for item in items[:2]}

    response = client.post(f"/v1/datasets/{dataset}/captions", json={"style": "tags"})
    assert response.status_code == 202, response.text
    job = wait_for_job(client, response.json()["id"], timeout_s=600)
    assert job["status"] == "completed", job
    result = job["result"]
    assert {k: result[k] for k in ("version", "base_version", "images", "captioned", "kept", "skipped", "failed")} \
        == {"version": 2, "base_version": 1, "images": 6, "captioned": 4, "kept": 2, "skipped": 0, "failed": 0}, result
    assert job["stage"] == "caption" and job["step"] == job["total_steps"] == 4

    v2 = client.get(f"/v1/datasets/{dataset}/images", params={"version": 2}).json()["data"]
    assert len(v2) == 6 and all(image["caption"].strip() for image in v2)  # a caption for every image
    for image in v2:
        if image["filename"] in user:
            assert image["caption"] == user[image["filename"]]  # the user's, kept as written
        else:
            assert image["caption"].startswith("sks, ") and "\n" not in image["caption"]
    v1 = client.get(f"/v1/datasets/{dataset}/images", params={"version": 1}).json()["data"]
    assert sorted(i["caption"] for i in v1) == sorted([*user.values(), "", "", "", ""])  # version 1 as it was

    # a cancelled run commits nothing
    again = client.post(f"/v1/datasets/{dataset}/captions", json={"overwrite": True}).json()
    cancelled = client.post(f"/v1/jobs/{again['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert wait_for_job(client, again["id"], timeout_s=600)["status"] == "cancelled"
    assert [v["version"] for v in client.get(f"/v1/datasets/{dataset}").json()["versions"]] == [1, 2]


# --- the page, with a captioner of known answers -------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def known_captions(storage, payload):
    """Answers "a <style> caption <sha[:6]>", two images a batch, a little slowly (progress shows)."""

    def captions(tasks):
        for start in range(0, len(tasks), 2):
            time.sleep(0.3)
            yield [CaptionOutcome(t["sha256"], text=f"a {payload.settings.style} caption {t['sha256'][:6]}")
                   for t in tasks[start:start + 2]]

    return captions


def run_jobs(built, stop: threading.Event) -> None:
    """The job runner's part: each queued job runs its pipeline, with the known captioner."""
    store, done = built.services.jobs.jobs, set()
    while not stop.is_set():
        for job_id in [j for j in built.queue.sent if j not in done]:
            done.add(job_id)
            ctx = JobContext(store, store.get(job_id))
            ctx.save(status="in_progress", started_at=time.time())
            try:
                JOB_PIPELINES[ctx.record.kind](ctx, {"captioner": known_captions})
                ctx.save(status="completed", progress=100.0, finished_at=time.time())
            except Exception as exc:
                ctx.save(status="failed", finished_at=time.time(),
                         error=JobError(type=type(exc).__name__, message=str(exc)))
        stop.wait(0.1)


@pytest.fixture()
def served(tmp_path):
    built = keyed_app(tmp_path / "storage", {"ui": (KEY, ["train"])})
    built.services.datasets.llm = GemmaLimits(model="gemma", source="models/tiny/gemma", max_model_len=512)
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
        yield built, f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        server.should_exit = True
        thread.join(10)


def test_caption_button_in_the_browser(browser, served):
    built, base_url = served
    headers = {"Authorization": f"Bearer {KEY}"}
    dataset = built.client.post("/v1/datasets", headers=headers, json={"name": "ui-shapes"}).json()["id"]
    items = upload_sample(built.client, dataset, 4, with_captions=1, headers=headers)
    store = built.services.datasets.store

    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=base_url, bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto("/")
        page.fill("#api-key", KEY)
        page.click("#api-key-save")
        page.goto("/#/datasets")
        browse_dataset(page, dataset, 4)
        assert page.locator("#ds-images figcaption", has_text="No caption").count() == 3

        # 1. short tags, with a trigger word: the three without a caption get one, the user's stays
        page.select_option("#ds-caption-style", "tags")
        page.fill("#ds-caption-trigger", "zxq")
        page.click("#ds-caption")
        page.wait_for_function("document.querySelector('#ds-caption-progress')?.innerText.startsWith('Captioned')")
        assert page.inner_text("#ds-caption-progress") == \
            "Captioned 3 images: version 2 (1 kept, 0 skipped, 0 failed)."
        page.wait_for_function("document.querySelector('#ds-browser-title')?.innerText.endsWith('version 2')")
        shown = page.locator("#ds-images figcaption").all_inner_texts()
        assert sorted(shown) == sorted([items[0].caption] + [f"zxq, a tags caption {sha[:6]}" for sha in (
            r["sha256"] for r in store.manifest(dataset, 1).to_pylist() if not r["caption"])])
        assert page.locator("#ds-images textarea").first.input_value() in shown  # the editable caption too

        # 2. replace them all, in sentences: version 3, version 2 keeps its captions
        page.select_option("#ds-caption-style", "sentence")
        page.check("#ds-caption-overwrite")
        page.click("#ds-caption")
        page.wait_for_function("document.querySelector('#ds-caption-progress')?.innerText.includes('version 3')")
        assert page.inner_text("#ds-caption-progress").startswith("Captioned 4 images: version 3 (0 kept")
        page.wait_for_function("document.querySelector('#ds-browser-title')?.innerText.endsWith('version 3')")
        assert all(text.startswith("zxq, a sentence caption ") for text in
                   page.locator("#ds-images figcaption").all_inner_texts())
        assert store.versions(dataset) == [1, 2, 3]
        assert sum(1 for r in store.manifest(dataset, 2).to_pylist() if "tags caption" in r["caption"]) == 3
        assert TRIGGER in items[0].caption
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dataset_captions.png"), full_page=True)
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
