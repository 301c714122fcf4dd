"""The web UI in headless Chromium (Debian's, driven by Playwright) against the real app.

Screenshots of every test land in artifacts/ui/. `make test` installs Debian's chromium; without
it these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.serve.helpers import browse_dataset, noise_image

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"



GEN_IMAGES_LOADED = "[...document.querySelectorAll('#gen-grid img')].every(i => i.complete && i.naturalWidth)"


def generate(page, prompt: str, n: int, submit: bool = True, **fields: str) -> None:
    page.goto("/#/generate")
    page.wait_for_selector("#gen-model option", state="attached")  # the models are loaded
    page.fill("#gen-prompt", prompt)
    page.select_option("#gen-n", str(n))
    for name, value in fields.items():
        set_field(page, f"#gen-{name}", value)
    if submit:
        page.click("#gen-submit")


def set_field(page, selector: str, value: str) -> None:
    if page.eval_on_selector(selector, "e => e.tagName") == "SELECT":
        page.select_option(selector, value)
    else:
        page.fill(selector, value)


def option_value(page, select: str, text: str) -> str:
    """The value of the option of `select` whose text contains `text`, once it is there."""
    option = page.locator(f"{select} option", has_text=text).first
    option.wait_for(state="attached")
    return option.get_attribute("value")


def lineage_of(page, card: str) -> dict[str, str]:
    """A gallery card's lineage list (dt → dd)."""
    texts = page.eval_on_selector_all(f"{card} dl.lineage > *", "items => items.map(i => i.textContent)")
    return dict(zip(texts[::2], texts[1::2]))


# The edit page's mask (the canvas that is uploaded): how many pixels are painted, and one pixel.
MASK_PAINTED = """() => {
  const c = document.querySelector('#edit-mask');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) if (d[i] > 127) n++;
  return n;
}"""
MASK_PIXEL = "([x, y]) => document.querySelector('#edit-mask').getContext('2d').getImageData(x, y, 1, 1).data[0]"


def brush_position(page) -> tuple[int, int]:
    x, y = page.eval_on_selector("#edit-canvas", "c => [c.dataset.brushX, c.dataset.brushY]")
    return int(x), int(y)


def grid_layout(page, selector: str) -> tuple[int, int, list[int]]:
    """(columns, rows, natural widths of the images) of an output grid, as laid out."""
    boxes = page.eval_on_selector_all(
        f"{selector} figure.thumb img",
        "imgs => imgs.map(i => { const r = i.getBoundingClientRect(); return [Math.round(r.x), Math.round(r.y), i.naturalWidth]; })")
    return len({x for x, _, _ in boxes}), len({y for _, y, _ in boxes}), [w for _, _, w in boxes]


def test_four_images_show_as_four_thumbnails_in_a_two_by_two_grid(page):
    generate(page, "a lighthouse at dusk", 4, size="64x64", seed="7", steps="2")
    page.wait_for_selector("#gen-grid[data-count='4'] figure.thumb img", timeout=120_000)
    page.wait_for_function(GEN_IMAGES_LOADED)
    columns, rows, widths = grid_layout(page, "#gen-grid")
    assert (columns, rows) == (2, 2)
    assert widths == [64, 64, 64, 64]
    assert page.locator("#gen-grid figure.thumb").count() == 4
    # open and download links per image point at the stored PNGs
    hrefs = page.eval_on_selector_all("#gen-grid figure.thumb a[download]", "links => links.map(a => a.href)")
    assert len(hrefs) == 4 and all("/v1/files/outputs/" in h for h in hrefs)


def test_progress_reaches_one_hundred_percent_and_eight_images_lay_out_two_by_four(page):
    # 40 steps (configs/local.yaml allows 50): long enough on the tiny model for the runner's
    # progress writes (every 0.2 s) and the SSE poll (0.25 s) to show steps in between.
    generate(page, "a field of tulips", 8, submit=False, size="64x64", seed="3", steps="40")
    # Every label the page shows, recorded in the page itself, so none is missed between polls.
    page.evaluate("""() => {
      window.progressLabels = [];
      new MutationObserver((records) => {
        for (const r of records) for (const node of r.addedNodes) window.progressLabels.push(node.textContent);
      }).observe(document.querySelector('#gen-progress-label'), { childList: true });
    }""")
    page.click("#gen-submit")
    page.wait_for_function("window.progressLabels.some(l => l.startsWith('100%'))", timeout=120_000)
    assert page.eval_on_selector("#gen-progress", "p => p.value") == 100
    labels = page.evaluate("window.progressLabels")
    percents = [int(re.match(r"(\d+)%", label).group(1)) for label in labels]
    assert any(0 < p < 100 for p in percents), labels  # progress was shown along the way, not only at the end
    assert percents == sorted(percents), labels  # and it never went backwards
    page.wait_for_selector("#gen-grid[data-count='8'] figure.thumb img")
    page.wait_for_function(GEN_IMAGES_LOADED)
    columns, rows, _ = grid_layout(page, "#gen-grid")
    assert (columns, rows) == (4, 2)


def test_a_bad_input_shows_the_apis_message(page, client):
    max_steps = next(m for m in client.get("/v1/models").json()["data"] if m["kind"] == "image")["metadata"]["max_steps"]
    generate(page, "too many steps", 1, steps=str(max_steps + 1))
    alert = page.locator("#gen-error")
    alert.wait_for(state="visible")
    assert alert.get_attribute("role") == "alert"
    assert f"steps must be at most {max_steps}" in alert.inner_text()
    assert page.locator("#gen-grid figure.thumb").count() == 0


def test_a_video_made_from_an_image_plays_and_shows_in_the_gallery(page, tmp_path):
    source = tmp_path / "still.png"
    source.write_bytes(noise_image(64, 64, seed=5))
    page.goto("/#/video")
    page.set_input_files("#video-image", str(source))
    # frames left to the model's default (the tiny SVD's limit is small)
    page.fill("#video-seed", "2")
    page.click("#video-submit")
    page.wait_for_selector("#video-player", timeout=180_000)
    page.wait_for_function("document.querySelector('#video-player')?.readyState >= 1", timeout=60_000)
    duration = page.eval_on_selector("#video-player", "v => v.duration")
    assert duration > 0, duration
    assert "100%" in page.inner_text("#video-progress-label")
    video_id = page.get_attribute("#video-result a[download]", "download").removesuffix(".mp4")

    # The gallery shows it as a video, with its poster and its lineage.
    page.goto("/#/gallery")
    card = f"#gallery-grid article[data-job='{video_id}'][data-kind='video']"
    page.wait_for_selector(f"{card} video")
    page.wait_for_function(f"document.querySelector(\"{card} video\")?.readyState >= 1", timeout=60_000)
    assert page.eval_on_selector(f"{card} video", "v => v.duration") > 0
    poster = page.eval_on_selector(f"{card} video", "v => v.poster")
    status, content_type = page.evaluate(
        "async (url) => { const r = await fetch(url); return [r.status, r.headers.get('content-type')]; }", poster)
    assert (status, content_type) == (200, "image/png"), poster
    lineage = lineage_of(page, card)
    assert lineage["Kind"] == "videos.image_to_video" and lineage["Seed"] == "2", lineage
    assert int(lineage["Frames"]) >= 1 and lineage["Size"] == "64 × 64", lineage
    assert page.locator(f"{card} .gallery-check").count() == 0  # datasets take images only
    # and its settings can be reused on the Video page
    # The Video page's form survives the trip to the gallery with the seed typed above, so only a
    # line that reuse() writes once it has fetched this job says the settings are in.
    page.click(f"{card} button.reuse")
    page.wait_for_function(
        "id => document.querySelector('#video-info').textContent.startsWith(`Settings loaded from video ${id}.`)",
        arg=video_id)
    assert page.input_value("#video-seed") == "2"
    assert page.input_value("#video-frames") == lineage["Frames"]


def test_the_inpainting_mask_can_be_painted_with_the_keyboard(page, client, tmp_path):
    source = tmp_path / "photo.png"
    source.write_bytes(noise_image(64, 64, seed=9))
    page.goto("/#/edit")
    page.wait_for_selector("#edit-size option:nth-child(2)", state="attached")  # the model's limits are loaded
    page.set_input_files("#edit-image", str(source))
    page.wait_for_selector("#edit-canvas", state="visible")
    assert page.eval_on_selector("#edit-mask", "c => [c.width, c.height]") == [64, 64]

    # Tab from the file input reaches the canvas, which says which keys it takes.
    page.focus("#edit-image")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "edit-canvas"
    label = page.get_attribute("#edit-canvas", "aria-label")
    assert "Arrow keys" in label and "Space or Enter" in label
    assert page.evaluate(MASK_PAINTED) == 0

    # An arrow moves the brush outline on the shown canvas, and paints nothing.
    shown = page.eval_on_selector("#edit-canvas", "c => c.toDataURL()")
    start = brush_position(page)
    page.keyboard.press("ArrowLeft")
    assert brush_position(page)[0] < start[0]
    assert page.eval_on_selector("#edit-canvas", "c => c.toDataURL()") != shown
    assert page.evaluate(MASK_PAINTED) == 0

    # Space paints a dot under the brush; Enter held while moving paints a line.
    dot_at = brush_position(page)
    page.keyboard.press("Space")
    dot = page.evaluate(MASK_PAINTED)
    assert dot > 0
    assert page.evaluate(MASK_PIXEL, list(dot_at)) > 200
    assert page.evaluate(MASK_PIXEL, [0, 0]) == 0  # far from the brush
    page.keyboard.down("Enter")
    for _ in range(6):
        page.keyboard.press("ArrowDown")
    page.keyboard.up("Enter")
    line_end = brush_position(page)
    assert line_end[1] > dot_at[1]
    assert page.evaluate(MASK_PIXEL, list(line_end)) > 200
    assert page.evaluate(MASK_PAINTED) > dot
    assert "Inpainting" in page.inner_text("#edit-mode")
    page.keyboard.press("]")  # a bigger brush
    assert page.input_value("#edit-brush") == "32"

    # Fill all and Clear, by button.
    page.click("#edit-fill")
    assert page.evaluate(MASK_PAINTED) == 64 * 64
    page.click("#edit-clear")
    assert page.evaluate(MASK_PAINTED) == 0
    assert "Image-to-image" in page.inner_text("#edit-mode")

    # A keyboard-painted mask is sent: the job inpaints.
    page.focus("#edit-canvas")
    page.keyboard.press("Enter")
    page.fill("#edit-prompt", "a stained glass window")
    page.fill("#edit-steps", "4")
    with page.expect_response(lambda r: "/v1/images/edits" in r.url and r.request.method == "POST") as answer:
        page.click("#edit-submit")
    assert answer.value.status == 202, answer.value.text()
    job_id = answer.value.json()["id"]
    page.wait_for_selector("#edit-grid[data-count='1'] figure.thumb img", timeout=120_000)
    assert "inpainted" in page.inner_text("#edit-grid figcaption")
    assert client.get(f"/v1/jobs/{job_id}").json()["params"]["sdxl"]["mode"] == "inpaint"


def collect_into_a_new_dataset(page, standin, name: str) -> str:
    """Collect page: search the stand-in's Unsplash and Pexels, import four distinct results into a
    new dataset `name`; returns its id."""
    page.goto("/#/collect")
    page.wait_for_selector("#co-src-unsplash:checked")
    page.wait_for_selector("#co-src-pexels:checked")
    page.fill("#co-query", "beach")
    page.fill("#co-per-page", "4")
    page.click("#co-search")
    page.wait_for_selector("#co-results li:nth-child(8)")
    assert "Ann Example" in page.inner_text("#co-results")  # results come with their credits
    for result in ("unsplash:u1", "unsplash:u2", "pexels:1", "pexels:3"):  # (u3 and pexels 2 repeat u1's bytes)
        page.check(f"[data-result='{result}']")
    page.fill("#co-new-dataset", name)
    page.fill("#co-tags", "beach")
    page.click("#co-import")
    page.wait_for_function("document.querySelector('#co-progress')?.innerText.startsWith('Imported')")
    assert page.inner_text("#co-progress").startswith("Imported 4 images into version 1")
    assert {"u1", "u2"} <= set(standin.pings)  # Unsplash's download_location was called for each
    return page.eval_on_selector("#co-dataset", "s => s.value")


def upload_a_new_dataset(page, tmp_path, name: str) -> str:
    """Datasets page: a new dataset `name` with four uploaded images; returns its id."""
    files = []
    for i in range(4):
        path = tmp_path / f"corgi{i}.png"
        path.write_bytes(noise_image(64, 64, seed=40 + i))
        files.append(str(path))
    page.goto("/#/datasets")
    page.fill("#ds-name", name)
    page.click("#ds-create")
    dataset_id = option_value(page, "#ds-select", name)
    page.select_option("#ds-select", value=dataset_id)
    page.set_input_files("#ds-files", files)
    page.click("#ds-upload")
    page.wait_for_function("document.querySelector('#ds-upload-result')?.innerText.startsWith('Added ')")
    assert re.fullmatch(r"Added 4 images: version \S+ has 4\.", page.inner_text("#ds-upload-result").strip())
    return dataset_id


def field_error(page, name: str) -> str:
    """The message shown under a training form field (#ft-<name>), once it is shown."""
    page.wait_for_selector(f"#ft-{name}-error", state="visible")
    assert page.get_attribute(f"#ft-{name}", "aria-invalid") == "true"
    return page.inner_text(f"#ft-{name}-error")


def test_collect_caption_train_and_generate_with_the_lora(page, atelier, client, tmp_path):
    """Issue 20's flow, collect → dataset → caption edit → train, on the real app, through to a
    generation with the trained LoRA; and issue 22's training form: hyperparameters checked here
    and by the API next to their fields; epoch, learning rate, samples/s and a validation image in
    the run view. Attached to a running app without the stand-in, the images are uploaded instead."""
    name = f"ui-beach-{int(time.time())}"
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" and "/v1/fine_tuning/jobs" in r.url
            else None)

    # 1. Collect (or upload), then edit a caption inline on the dataset page.
    if atelier.standin is not None:
        dataset_id = collect_into_a_new_dataset(page, atelier.standin, name)
    else:
        dataset_id = upload_a_new_dataset(page, tmp_path, name)
    page.goto("/#/datasets")
    browse_dataset(page, dataset_id, 4)
    caption = page.locator("#ds-images textarea").first
    image_id = caption.get_attribute("data-image")
    caption.fill("sks beach, a caption edited inline")
    caption.press("Tab")  # change fires on leaving the field
    page.wait_for_function("document.querySelector('#ds-browser-status')?.innerText.startsWith('Caption saved')")
    assert "version 2 has 4 images" in page.inner_text("#ds-browser-status")
    images = client.get(f"/v1/datasets/{dataset_id}/images").json()
    assert images["version"] == 2
    assert {i["id"]: i["caption"] for i in images["data"]}[image_id] == "sks beach, a caption edited inline"

    # 2. The training form: a bad value is refused by the page, before any request, next to its field...
    page.select_option("#ft-dataset", value=option_value(page, "#ft-dataset", name))
    page.fill("#ft-suffix", name)
    page.fill("#ft-lr", "0.001")
    page.fill("#ft-steps", "4")
    page.fill("#ft-batch", "1")
    page.fill("#ft-resolution", "100")
    page.select_option("#ft-method", "dreambooth")
    page.click("#ft-start")
    assert "multiple of 8" in field_error(page, "resolution")
    assert "class prompt" in field_error(page, "class-prompt")
    assert sent == []
    page.select_option("#ft-method", "lora")
    assert page.is_hidden("#ft-class-prompt")
    page.fill("#ft-resolution", "64")
    # ...and one the page lets through (a rank within the hard ceiling) is the API's 400, shown there too
    page.fill("#ft-rank", "1000")
    page.click("#ft-start")
    assert "at most 256" in field_error(page, "rank")
    assert page.is_hidden("#ft-resolution-error") and len(sent) == 1

    # 3. Train: 4 steps of batch 1 on 2 workers with 2 images each are 2 epochs.
    page.fill("#ft-rank", "4")
    page.click("#ft-start")
    status = page.locator("#ft-status")
    deadline = time.monotonic() + 420
    # the job's status badge (the run's own state, in brackets, says "succeeded" a little earlier than Ray)
    while page.inner_text("#ft-status .badge") != "succeeded":
        text = status.inner_text()
        assert "failed" not in text and "cancelled" not in text, text
        assert time.monotonic() < deadline, f"training did not finish: {text}"
        time.sleep(1)
    job = next(j for j in client.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"]
               if j["suffix"] == name)
    assert job["status"] == "succeeded" and job["hyperparameters"]["learning_rate"] == 0.001
    assert (job["total_steps"], job["epochs"], job["epoch"]) == (4, 2, 2)
    assert page.inner_text("#ft-epoch") == "2 of 2"
    assert float(page.inner_text("#ft-lr-now")) == pytest.approx(job["learning_rate"], rel=0.01)
    assert job["samples_per_s"] > 0 and float(page.inner_text("#ft-rate")) == pytest.approx(job["samples_per_s"],
                                                                                             abs=0.01)
    page.wait_for_selector("#ft-chart svg")  # the loss chart, from the run's metrics events

    # 4. The validation image of the final adapter: shown, and its download is the PNG.
    assert [(i["step"], i["seed"]) for i in job["validation_images"]] == [(4, 0)]
    figure = "#ft-validation-grid figure"
    page.wait_for_function(f"[...document.querySelectorAll('{figure} img')].every(i => i.complete && i.naturalWidth)")
    assert page.eval_on_selector_all(f"{figure} img", "imgs => imgs.map(i => i.naturalWidth)") == [64]
    assert "Step 4 (final), seed 0" in page.inner_text(figure)
    href = page.get_attribute(f"{figure} a[download]", "href")
    with page.expect_download() as download:
        page.click(f"{figure} a[download]")
    saved = Image.open(download.value.path())
    assert saved.format == "PNG" and saved.size == (64, 64), href
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "training_run.png"), full_page=True)  # the run view, for review

    # 5. Generate with the LoRA, picked for us by the run's "Generate with it" link.
    lora = job["fine_tuned_model"]
    assert page.inner_text("#ft-lora") == lora and lora.startswith(f"{name}:")
    # trained on the edited version: the adapter's manifest names version 2 and its dataset
    card = client.get(f"/v1/models/{lora}").json()["metadata"]
    assert (card["dataset_id"], card["dataset_version"]) == (dataset_id, 2), card
    page.click("#ft-model a")
    page.wait_for_function("lora => document.querySelector('#gen-model')?.value === lora", arg=lora)
    assert page.locator("#gen-model option", has_text=name).count() == 1
    page.fill("#gen-prompt", "a portrait")
    set_field(page, "#gen-size", "64x64")
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data or "") if r.method == "POST" else None)
    page.click("#gen-submit")
    page.wait_for_selector("#gen-grid[data-count='1'] figure.thumb img", timeout=120_000)
    assert any(f'"lora":"{lora}"' in body.replace(" ", "") for body in bodies), bodies  # sent with the LoRA


# What shows that a page has rendered its data (its show() has finished), by route.
RENDERED = {
    "generate": ("#gen-size option",),
    "edit": ("#edit-size option:nth-child(2)",),
    "video": ("#video-submit",),
    "gallery": ("#gallery-grid > *", "#gallery-dataset option"),
    "datasets": ("#ds-list > *", "#ft-jobs caption", "#ds-select option"),
    "workflows": ("#wf-saved > li",),
}


def test_phone_width_has_no_horizontal_scroll(browser, atelier):
    context = browser.new_context(viewport={"width": 375, "height": 800}, base_url=atelier.base_url,
                                  bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def overflow() -> int:
        return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")

    try:
        for route, selectors in RENDERED.items():
            # Only the hash changes after the first page: wait for this page's own content.
            page.goto(f"/#/{route}")
            page.wait_for_selector(f"#page-{route}", state="visible")
            for selector in selectors:
                page.wait_for_selector(f"#page-{route} {selector}", state="attached")
            page.screenshot(path=str(ARTIFACTS / f"phone_{route}.png"), full_page=True)
            assert overflow() <= 0, f"#{route} scrolls sideways by {overflow()}px at 375px"

        # A full batch of 8 at phone width: 2 columns of 4 rows, still no sideways scroll.
        generate(page, "a row of boats", 8, size="64x64", seed="5", steps="2")
        page.wait_for_selector("#gen-grid[data-count='8'] figure.thumb img", timeout=120_000)
        page.wait_for_function(GEN_IMAGES_LOADED)
        page.screenshot(path=str(ARTIFACTS / "phone_generate_8.png"), full_page=True)
        assert grid_layout(page, "#gen-grid")[:2] == (2, 4)
        assert overflow() <= 0, f"8 images scroll sideways by {overflow()}px at 375px"
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_the_ui_runs_under_its_csp(browser, atelier):
    """The real headers, no bypass: every page of the UI loads and runs with no CSP violation."""
    context = browser.new_context(base_url=atelier.base_url)
    page = context.new_page()
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    page.on("pageerror", lambda exc: violations.append(str(exc)))
    response = page.goto("/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_load_state("networkidle")
    for link in page.locator("nav a").all():
        link.click()
        page.wait_for_load_state("networkidle")
    context.close()
    assert violations == []
