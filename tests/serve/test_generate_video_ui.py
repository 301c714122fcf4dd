"""Issue 22: the Generate page's HD (x4) option and the Video page's controls (size and aspect,
motion bucket and noise augmentation, a video preset, the upscale options) in headless Chromium,
asserting on the request each page sends and on the decoded output; and LoRAs on
/v1/images/edits and the workflow's image_to_image node, on the real app.

Lean on purpose (the suite is near its time budget): the package's app, 64x64 or smaller, 2 steps,
2 frames.
"""

from __future__ import annotations

import base64
import io
import re
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from deployments.media import decode_mp4
from tests.serve.helpers import noise_image, wait_for_job

pytestmark = pytest.mark.serve




def is_post(path: str):
    return lambda request: request.method == "POST" and request.url.split("?")[0].endswith(path)


# Chromium leaves a multipart body holding a file out of the request Playwright sees (post_data is
# None), so the page's own fetch records the FormData it sends: field -> value, a file as "file:NAME".
RECORD_FORMS = """() => {
  window.sentForms = [];
  const send = window.fetch;
  window.fetch = (input, init) => {
    if (init && init.body instanceof FormData) {
      window.sentForms.push(Object.fromEntries([...init.body.entries()].map(
        ([name, value]) => [name, typeof value === "string" ? value : `file:${value.name}`])));
    }
    return send(input, init);
  };
}"""


# --- Generate: HD (x4) --------------------------------------------------------------------------


def test_generate_hd_sends_upscale_and_shows_four_times_larger_images(page, client):
    page.goto("/#/generate")
    page.wait_for_selector("#gen-model option", state="attached")
    page.wait_for_selector("#gen-hd-row", state="visible")  # the local app deploys the upscaler
    page.fill("#gen-prompt", "a lighthouse, HD")
    page.select_option("#gen-size", "64x64")
    page.fill("#gen-seed", "5")
    page.fill("#gen-steps", "2")
    assert page.inner_text("#gen-hd-hint") == ""
    page.check("#gen-hd")
    assert "64 × 64 → 256 × 256" in page.inner_text("#gen-hd-hint")
    with page.expect_request(is_post("/v1/images/generations")) as sent:
        page.click("#gen-submit")
    body = sent.value.post_data_json
    assert (body["upscale"], body["size"], body["steps"], body["seed"]) == (True, "64x64", 2, 5)
    assert "async=true" in sent.value.url

    page.wait_for_selector("#gen-grid.hd[data-count='1'] figure.thumb img", timeout=180_000)
    page.wait_for_function("[...document.querySelectorAll('#gen-grid img')].every(i => i.complete && i.naturalWidth)")
    assert page.eval_on_selector("#gen-grid img", "i => [i.naturalWidth, i.naturalHeight]") == [256, 256]
    summary = page.inner_text("#gen-summary")
    assert "256×256 (HD x4 of 64×64)" in summary, summary
    job_id = re.search(r"\(job (\S+)\)", summary).group(1)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "images.text_to_image_hd" and job["stages"] == ["generate", "upscale"]
    png = client.get(f"/v1/files/{job['outputs'][0]['key']}").content
    assert Image.open(io.BytesIO(png)).size == (256, 256)  # the stored file, decoded

    # Unchecked, the same form is a plain generation at the chosen size.
    page.uncheck("#gen-hd")
    with page.expect_request(is_post("/v1/images/generations")) as sent:
        page.click("#gen-submit")
    assert "upscale" not in sent.value.post_data_json
    page.wait_for_selector("#gen-grid:not(.hd)[data-count='1'] figure.thumb img", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gen-grid img')].every(i => i.complete && i.naturalWidth)")
    assert page.eval_on_selector("#gen-grid img", "i => i.naturalWidth") == 64


# --- Video: size and aspect, motion, noise, a preset, upscale -----------------------------------


def test_the_video_page_sends_its_controls_and_upscales_the_video(page, client, tmp_path):
    preset = f"ui-video-{uuid.uuid4().hex[:8]}"
    made = client.post("/v1/presets", json={"name": preset, "kind": "video", "fps": 5, "motion_bucket_id": 90,
                                            "noise_aug_strength": 0.07, "steps": 3, "size": "64x64"})
    assert made.status_code == 201, made.text
    source = tmp_path / "still.png"
    source.write_bytes(noise_image(64, 64, seed=4))
    try:
        page.goto("/#/video")
        page.wait_for_selector(f"#video-preset option[value='{preset}']", state="attached")
        page.wait_for_selector("#video-upscale-options", state="visible")  # the local app deploys the upscaler
        page.set_input_files("#video-image", str(source))

        # The preset fills motion, noise, fps, steps and the size (with its aspect).
        page.select_option("#video-preset", preset)
        assert [page.input_value(f"#video-{f}") for f in ("fps", "motion", "noise", "steps")] == ["5", "90", "0.07", "3"]
        assert (page.input_value("#video-aspect"), page.input_value("#video-size")) == ("1:1", "64x64")

        # Another aspect lists sizes of that shape within the model's limits.
        page.select_option("#video-aspect", "16:9")
        sizes = page.eval_on_selector_all("#video-size option", "os => os.map(o => o.value)")
        assert "64x40" in sizes and all(
            abs(int(w) / int(h) - 16 / 9) < 0.25 for w, h in (s.split("x") for s in sizes)), sizes
        page.select_option("#video-size", "64x40")
        page.fill("#video-frames", "2")
        page.fill("#video-steps", "2")
        page.fill("#video-motion", "60")  # the form's own values win over the preset's
        page.fill("#video-noise", "0.1")
        page.fill("#video-seed", "9")
        page.check("#video-upscale-video")
        page.fill("#video-upscale-steps", "2")
        page.fill("#video-noise-level", "10")
        page.evaluate(RECORD_FORMS)
        with page.expect_request(is_post("/v1/videos")) as sent:
            page.click("#video-submit")
        assert sent.value.headers["content-type"].startswith("multipart/form-data")
        fields = page.evaluate("window.sentForms")
        assert fields == [{"input_reference": "file:still.png", "preset": preset, "size": "64x40", "num_frames": "2",
                           "fps": "5", "motion_bucket_id": "60", "noise_aug_strength": "0.1", "steps": "2",
                           "seed": "9", "upscale_video": "true", "upscale_steps": "2", "noise_level": "10"}], fields

        page.wait_for_selector("#video-player", timeout=240_000)
        video_id = page.get_attribute("#video-result a[download]", "download").removesuffix(".mp4")
        job = client.get(f"/v1/jobs/{video_id}").json()
        svd = job["params"]["svd"]
        assert (svd["motion_bucket_id"], svd["noise_aug_strength"], svd["width"], svd["height"]) == (60, 0.1, 64, 40)
        mp4 = client.get(f"/v1/videos/{video_id}/content", follow_redirects=True).content
        frames, fps = decode_mp4(mp4)
        assert len(frames) == 2 and all(frame.size == (256, 160) for frame in frames)  # x4 of 64x40
        assert fps == pytest.approx(5)
        assert "2 frames at 5 fps" in page.inner_text("#video-result")
    finally:
        client.delete(f"/v1/presets/{preset}")


# --- LoRAs on edits and on the workflow's image_to_image node (API, real app) ---------------------


def registered_lora(atelier, client, tmp_path) -> str:
    """A random adapter on the tiny SDXL, registered in the app's storage as a training run would
    register it (as tests/serve/test_metrics.py makes one)."""
    if getattr(atelier, "config_path", None) is None:
        pytest.skip("an attached app: its storage is not known here")
    from local.tiny_models import build_random_lora
    from storage import Storage
    from storage.registry import LoraRegistry

    args = yaml.safe_load(atelier.config_path.read_text())["applications"][0]["args"]
    base = str((Path(args["base_dir"]) / args["sdxl"]["model"]).resolve())
    name = f"edits-{uuid.uuid4().hex[:8]}"
    (tmp_path / name).mkdir()
    return LoraRegistry(Storage(args["storage_root"])).register(
        name, {"base_model": base, "rank": 4}, build_random_lora(base, tmp_path / name, seed=6)).id


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def test_a_lora_changes_an_edit_and_a_workflow_image_to_image_node(atelier, client, tmp_path):
    lora = registered_lora(atelier, client, tmp_path)
    name = lora.split(":")[0]
    image = noise_image(64, 64, seed=8)

    def edit(**fields) -> httpx.Response:
        return client.post("/v1/images/edits", files={"image": ("in.png", image, "image/png")},
                           data={"prompt": "a boat", "seed": "3", "steps": "2", "response_format": "b64_json",
                                 **fields})

    base, with_lora = edit(), edit(lora=name)
    assert base.status_code == 200 and with_lora.status_code == 200, (base.text, with_lora.text)
    base_png, lora_png = (base64.b64decode(r.json()["data"][0]["b64_json"]) for r in (base, with_lora))
    assert np.abs(pixels(base_png) - pixels(lora_png)).mean() > 1.0
    assert Image.open(io.BytesIO(lora_png)).text["lora"] == lora  # the PNG's lineage
    missing = edit(lora="no-such-lora")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "lora"

    # As a job: the output's lineage names the adapter, version and weights.
    job = client.post("/v1/images/edits", params={"async": "true"}, files={"image": ("in.png", image, "image/png")},
                      data={"prompt": "a boat", "seed": "3", "steps": "2", "lora": name}).json()
    job = wait_for_job(client, job["id"], timeout_s=180)
    assert job["status"] == "completed", job
    lineage = job["outputs"][0]["extra"]["lineage"]["lora"]
    assert (lineage["name"], lineage["version"]) == (name, 1) and lineage["sha256"]

    # A workflow: the same stored image redrawn with and without the LoRA, under one seed.
    def redraw(node_id: str, **params) -> dict:
        return {"id": node_id, "type": "image_to_image", "params": {"seed": 4, "steps": 2, **params}}

    workflow = {"nodes": [{"id": "img", "type": "image", "params": {"key": job["outputs"][0]["key"]}},
                          {"id": "p", "type": "prompt", "params": {"text": f"a boat {uuid.uuid4().hex[:6]}"}},
                          redraw("plain"), redraw("styled", lora=name, lora_scale=1.0),
                          {"id": "out_plain", "type": "output", "params": {}},
                          {"id": "out_styled", "type": "output", "params": {}}],
                "edges": [edge for node in ("plain", "styled") for edge in (
                    {"source": "img", "source_port": "image", "target": node, "target_port": "image"},
                    {"source": "p", "source_port": "text", "target": node, "target_port": "prompt"},
                    {"source": node, "source_port": "images", "target": f"out_{node}", "target_port": "value"})]}
    run = client.post("/v1/workflows/runs", json={"workflow": workflow})
    assert run.status_code == 202, run.text
    done = wait_for_job(client, run.json()["id"], timeout_s=240)
    assert done["status"] == "completed", done
    outputs = {o["extra"]["node"]: o for o in done["outputs"]}
    plain, styled = (client.get(f"/v1/files/{outputs[n]['key']}").content for n in ("out_plain", "out_styled"))
    assert np.abs(pixels(plain) - pixels(styled)).mean() > 1.0
    nodes = {n["id"]: n for n in outputs["out_styled"]["extra"]["lineage"]["nodes"]}
    assert nodes["styled"]["lora"] == {"name": name, "version": 1, "sha256": lineage["sha256"]}
    assert "lora" not in {n["id"]: n for n in outputs["out_plain"]["extra"]["lineage"]["nodes"]}["plain"]
