"""The web UI in headless Chromium (Debian's, driven by Playwright) against the real app.

Screenshots of every test land in artifacts/ui/. `make test` installs Debian's chromium; without
it these tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from tests.serve.helpers import noise_image

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
CHROMIUM = os.environ.get("ATELIER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# As root and on a closed network: no sandbox, and none of Chromium's background fetches.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        message = "no chromium: `make test` installs Debian's chromium package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, atelier, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=atelier.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def generate(page, prompt: str, n: int, **fields: str) -> None:
    page.goto("/#/generate")
    page.wait_for_selector("#gen-model option", state="attached")  # the models are loaded
    page.fill("#gen-prompt", prompt)
    page.select_option("#gen-n", str(n))
    for name, value in fields.items():
        set_field(page, f"#gen-{name}", value)
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


def grid_layout(page, selector: str) -> tuple[int, int, list[int]]:
    """(columns, rows, natural widths of the images) of an output grid, as laid out."""
    boxes = page.eval_on_selector_all(
        f"{selector} figure.thumb img",
        "imgs => imgs.map(i => { const r = i.getBoundingClientRect(); return [Math.round(r.x), Math.round(r.y), i.naturalWidth]; })")
    return len({x for x, _, _ in boxes}), len({y for _, y, _ in boxes}), [w for _, _, w in boxes]


def test_four_images_show_as_four_thumbnails_in_a_two_by_two_grid(page):
    generate(page, "a lighthouse at dusk", 4, size="64x64", seed="7", steps="2")
    page.wait_for_selector("#gen-grid[data-count='4'] figure.thumb img", timeout=120_000)
    page.wait_for_function("[...document.querySelectorAll('#gen-grid img')].every(i => i.complete && i.naturalWidth)")
    columns, rows, widths = grid_layout(page, "#gen-grid")
    assert (columns, rows) == (2, 2)
    assert widths == [64, 64, 64, 64]
    assert page.locator("#gen-grid figure.thumb").count() == 4
    # open and download links per image point at the stored PNGs
    hrefs = page.eval_on_selector_all("#gen-grid figure.thumb a[download]", "links => links.map(a => a.href)")
    assert len(hrefs) == 4 and all("/v1/files/outputs/" in h for h in hrefs)


def test_progress_reaches_one_hundred_percent_and_eight_images_lay_out_two_by_four(page):
    generate(page, "a field of tulips", 8, size="64x64", seed="3", steps="6")
    seen = set()
    deadline = time.monotonic() + 120
    while not any(label.startswith("100%") for label in seen):
        assert time.monotonic() < deadline, f"progress never reached 100%: {sorted(seen)}"
        seen.add(page.inner_text("#gen-progress-label").strip())
        time.sleep(0.05)
    assert page.eval_on_selector("#gen-progress", "p => p.value") == 100
    page.wait_for_selector("#gen-grid[data-count='8'] figure.thumb img")
    page.wait_for_function("[...document.querySelectorAll('#gen-grid img')].every(i => i.complete && i.naturalWidth)")
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


def test_a_video_made_from_an_image_plays(page, tmp_path):
    source = tmp_path / "still.png"
    source.write_bytes(noise_image(64, 64, seed=5))
    page.goto("/#/video")
    page.set_input_files("#video-image", str(source))
    # frames left to the model's default (the tiny SVD's limit is small)
    page.fill("#video-seed", "2")
    page.click("#video-submit")
    page.wait_for_selector("#video-player", timeout=180_000)
    page.wait_for_function("document.querySelector('#video-player').readyState >= 1", timeout=60_000)
    duration = page.eval_on_selector("#video-player", "v => v.duration")
    assert duration > 0, duration
    assert "100%" in page.inner_text("#video-progress-label")


def test_a_lora_trained_from_the_ui_appears_in_the_generate_picker(page, tmp_path):
    name = f"ui-corgi-{int(time.time())}"
    files = []
    for i in range(4):
        path = tmp_path / f"corgi{i}.png"
        path.write_bytes(noise_image(64, 64, seed=40 + i))
        files.append(str(path))

    page.goto("/#/datasets")
    page.fill("#ds-name", name)
    page.fill("#ds-trigger", "sks corgi")
    page.click("#ds-create")
    page.select_option("#ds-select", value=option_value(page, "#ds-select", name))
    page.set_input_files("#ds-files", files)
    page.click("#ds-upload")
    page.wait_for_function("document.querySelector('#ds-upload-result').innerText.includes('4')")

    page.select_option("#ft-dataset", value=option_value(page, "#ft-dataset", name))
    page.fill("#ft-suffix", name)
    page.fill("#ft-steps", "4")
    page.click("#ft-start")
    status = page.locator("#ft-status")
    deadline = time.monotonic() + 420
    while "succeeded" not in (text := status.inner_text()):
        assert "failed" not in text and "cancelled" not in text, text
        assert time.monotonic() < deadline, f"training did not finish: {text}"
        time.sleep(1)

    page.goto("/#/generate")
    option = page.locator("#gen-model option", has_text=name)
    option.wait_for(state="attached")
    assert option.count() == 1
    # and it generates with it
    page.select_option("#gen-model", value=option.get_attribute("value"))
    page.fill("#gen-prompt", "a portrait")
    set_field(page, "#gen-size", "64x64")
    page.click("#gen-submit")
    page.wait_for_selector("#gen-grid[data-count='1'] figure.thumb img", timeout=120_000)


def test_phone_width_has_no_horizontal_scroll(browser, atelier):
    context = browser.new_context(viewport={"width": 375, "height": 800}, base_url=atelier.base_url)
    page = context.new_page()
    try:
        for route in ("generate", "edit", "video", "gallery", "datasets", "workflows"):
            page.goto(f"/#/{route}")
            page.wait_for_load_state("networkidle")
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"#{route} scrolls sideways by {overflow}px at 375px"
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.goto("/#/generate")
        page.screenshot(path=str(ARTIFACTS / "phone_generate.png"), full_page=True)
    finally:
        context.close()
