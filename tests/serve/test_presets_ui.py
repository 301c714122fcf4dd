"""The Presets page (issue 22) in headless Chromium against the real app: own image and video
presets created, edited and deleted through the UI; API errors next to the field they name; an own
preset in Generate's style select, and used by the job it starts. Screenshots land in artifacts/ui/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"


@pytest.fixture()
def page(browser, atelier, request):
    # The app's real CSP (no bypass): the test waits with selectors only, never with eval'd predicates.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=atelier.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    # The API's 4xx answers are the point of part of this test; Chromium logs each as a failed resource.
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}")
            if m.type == "error" and "the server responded with a status of 4" not in m.text else None)
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def row_cells(page, table: str, name: str) -> dict[str, str]:
    """A preset's row in one of the page's tables: {column header: cell text}."""
    head = page.eval_on_selector_all(f"#{table} thead th", "cells => cells.map(c => c.textContent)")
    cells = page.eval_on_selector_all(f"#{table} tr[data-preset='{name}'] > *", "cells => cells.map(c => c.textContent)")
    return dict(zip(head, cells))


def wait_for_row(page, table: str, name: str, **expected: str) -> dict[str, str]:
    """A preset's row once its cells read as expected: the table is rebuilt after a save, and a
    wait on text that the old row also holds would read the old row."""
    deadline = time.monotonic() + 60
    while True:
        cells = row_cells(page, table, name)
        if all(cells.get(column) == value for column, value in expected.items()):
            return cells
        assert time.monotonic() < deadline, (expected, cells)
        page.wait_for_timeout(100)


def save_and_expect(page, status: int) -> dict:
    with page.expect_response(lambda r: "/v1/presets" in r.url and r.request.method in ("POST", "PUT")) as answer:
        page.click("#preset-save")
    assert answer.value.status == status, answer.value.text()
    return answer.value.json()


def field_error(page, field: str) -> str:
    """The error shown under a field (waits for it), after checking the control is marked invalid."""
    box = page.locator(f"#preset-{field}-error")
    box.wait_for(state="visible")
    assert page.get_attribute(f"#preset-{field}", "aria-invalid") == "true"
    assert f"preset-{field}-error" in page.get_attribute(f"#preset-{field}", "aria-describedby")
    assert page.locator("#preset-error").is_visible()  # and the alert says where to look
    return box.inner_text()


def style_options(page) -> list[tuple[str, str]]:
    """Generate's style select: (value, the label of its optgroup or "") in order."""
    return [tuple(o) for o in page.eval_on_selector("#gen-style", """s => [...s.options].map(
      o => [o.value, o.parentElement.tagName === 'OPTGROUP' ? o.parentElement.label : ''])""")]


def test_image_presets_are_created_used_edited_and_deleted_from_the_ui(page, client):
    name = f"ui-studio-{int(time.time())}"
    page.goto("/#/presets")
    # The built-in styles are listed, marked and read-only: they can be copied, not edited.
    page.wait_for_selector("#preset-builtin tr[data-preset='photographic']")
    builtin_row = page.locator("#preset-builtin tr[data-preset='photographic']")
    assert "built-in" in builtin_row.inner_text()
    assert builtin_row.get_by_role("button", name="Edit photographic").count() == 0
    assert builtin_row.get_by_role("button", name="Copy photographic into a new preset").count() == 1

    # 1. A bad value: the API's error shows under the field its `param` names; nothing is saved.
    page.fill("#preset-name", name)
    page.fill("#preset-category", "product")
    page.fill("#preset-prompt", "studio lighting, softbox")  # no {prompt}
    page.fill("#preset-steps", "3")
    error = save_and_expect(page, 400)["error"]
    assert error["param"] == "prompt"
    assert "{prompt}" in field_error(page, "prompt")
    assert not page.locator("#preset-steps-error").is_visible()
    assert client.get(f"/v1/presets/{name}").status_code == 404

    # 2. Fixed, it is created with every image field, and listed as the caller's own.
    page.fill("#preset-prompt", "{prompt}, studio lighting, softbox")
    page.fill("#preset-negative", "blurry")
    page.fill("#preset-size", "64x64")
    page.fill("#preset-guidance", "6.5")
    saved = save_and_expect(page, 201)
    assert not page.locator("#preset-prompt-error").is_visible()
    page.wait_for_selector(f"#preset-own-image tr[data-preset='{name}']")
    assert row_cells(page, "preset-own-image", name) == {
        "Name": name, "Category": "product", "Template": "{prompt}, studio lighting, softbox", "Negative": "blurry",
        "Size": "64x64", "Steps": "3", "Guidance": "6.5", "Actions": "Edit Delete"}
    stored = client.get(f"/v1/presets/{name}").json()
    fields = ("kind", "category", "prompt", "negative_prompt", "size", "steps", "guidance_scale")
    assert {k: stored[k] for k in fields} == {
        "kind": "image", "category": "product", "prompt": "{prompt}, studio lighting, softbox",
        "negative_prompt": "blurry", "size": "64x64", "steps": 3, "guidance_scale": 6.5}
    assert saved["name"] == name and page.input_value("#preset-name") == name
    assert page.get_attribute("#preset-name", "readonly") is not None  # the form now edits it

    # 3. A built-in's name is refused next to the name field.
    page.click("#preset-new")
    page.fill("#preset-name", "photographic")
    page.fill("#preset-prompt", "{prompt}, mine")
    assert save_and_expect(page, 403)["error"]["param"] == "name"
    assert "read-only" in field_error(page, "name")

    # 4. Generate's style select lists it after the built-ins, and a job made with it uses it.
    page.goto("/#/generate")
    page.wait_for_selector(f"#gen-style option[value='{name}']", state="attached")
    options = style_options(page)
    builtins = [value for value, group in options if value != "none" and not group]
    assert "photographic" in builtins
    assert options.index((name, "Your presets")) > max(options.index((b, "")) for b in builtins)
    page.select_option("#gen-style", name)
    assert page.input_value("#gen-size") == "64x64"  # the preset's size
    page.fill("#gen-prompt", "a desk lamp")
    with page.expect_response(lambda r: "/v1/images/generations" in r.url and r.request.method == "POST") as answer:
        page.click("#gen-submit")
    assert answer.value.status == 202, answer.value.text()
    page.wait_for_selector("#gen-grid[data-count='1'] figure.thumb img", timeout=120_000)
    sdxl = client.get(f"/v1/jobs/{answer.value.json()['id']}").json()["params"]["sdxl"]
    assert sdxl["prompt"] == "a desk lamp, studio lighting, softbox"
    assert (sdxl["negative_prompt"], sdxl["steps"], sdxl["guidance_scale"]) == ("blurry", 3, 6.5)
    assert (sdxl["width"], sdxl["height"]) == (64, 64)

    # 5. Edited: the row and the stored preset change; a bad value on edit is refused by field.
    page.goto("/#/presets")
    page.get_by_role("button", name=f"Edit {name}").click()
    assert page.inner_text("#preset-form-title") == f"Edit preset {name}"
    assert page.input_value("#preset-prompt") == "{prompt}, studio lighting, softbox"
    page.fill("#preset-steps", "0")
    save_and_expect(page, 400)
    assert "greater than or equal to 1" in field_error(page, "steps")
    assert client.get(f"/v1/presets/{name}").json()["steps"] == 3
    page.fill("#preset-steps", "5")
    page.fill("#preset-category", "studio")
    save_and_expect(page, 200)
    cells = wait_for_row(page, "preset-own-image", name, Steps="5", Category="studio")
    assert (cells["Template"], cells["Size"]) == ("{prompt}, studio lighting, softbox", "64x64")
    assert not page.locator("#preset-steps-error").is_visible()
    stored = client.get(f"/v1/presets/{name}").json()
    assert (stored["steps"], stored["category"], stored["size"]) == (5, "studio", "64x64")

    # 6. Deleted (after the confirm dialog): gone from the list, the API and Generate's select.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Delete {name}").click()
    page.wait_for_selector(f"#preset-own-image tr[data-preset='{name}']", state="detached")
    others = [p for p in client.get("/v1/presets").json()["data"] if p.get("kind") == "image" and not p.get("builtin")]
    if not others:  # other tests of this app (the fuzz) may have left presets of the same owner
        assert "No image presets of yours yet" in page.inner_text("#preset-own-image")
    assert client.get(f"/v1/presets/{name}").status_code == 404
    page.goto("/#/generate")  # the page was shown before: its select is filled again by show()
    page.wait_for_selector(f"#gen-style option[value='{name}']", state="detached")
    assert "photographic" in [value for value, _ in style_options(page)]


def test_video_presets_take_the_video_fields(page, client):
    name = f"ui-drift-{int(time.time())}"
    page.goto("/#/presets")
    page.wait_for_selector("#preset-builtin tr[data-preset='photographic']")
    page.fill("#preset-name", name)
    page.select_option("#preset-kind", "video")
    assert page.locator("#preset-video-fields").is_visible() and not page.locator("#preset-image-fields").is_visible()
    page.fill("#preset-category", "slow")
    page.fill("#preset-seconds", "2")
    page.fill("#preset-fps", "8")
    page.fill("#preset-motion", "300")  # over 255
    page.fill("#preset-noise", "0.05")
    page.fill("#preset-size", "64x64")
    page.fill("#preset-steps", "4")
    assert save_and_expect(page, 400)["error"]["param"] == "motion_bucket_id"
    assert "less than or equal to 255" in field_error(page, "motion")

    page.fill("#preset-motion", "100")
    page.fill("#preset-frames", "12")  # 2 s at 8 fps is 16 frames
    assert save_and_expect(page, 400)["error"]["param"] == "num_frames"
    assert "disagree" in field_error(page, "frames")
    assert not page.locator("#preset-motion-error").is_visible()

    page.fill("#preset-frames", "16")
    save_and_expect(page, 201)
    page.wait_for_selector(f"#preset-own-video tr[data-preset='{name}']")
    assert row_cells(page, "preset-own-video", name) == {
        "Name": name, "Category": "slow", "Seconds": "2", "Frames": "16", "FPS": "8", "Motion": "100",
        "Noise aug.": "0.05", "Size": "64x64", "Steps": "4", "Actions": "Edit Delete"}
    stored = client.get(f"/v1/presets/{name}").json()
    assert {k: stored[k] for k in ("kind", "seconds", "num_frames", "fps", "motion_bucket_id", "noise_aug_strength",
                                   "size", "steps", "prompt")} == {
        "kind": "video", "seconds": 2.0, "num_frames": 16, "fps": 8, "motion_bucket_id": 100,
        "noise_aug_strength": 0.05, "size": "64x64", "steps": 4, "prompt": None}
    # Edited to a length in frames only.
    page.fill("#preset-seconds", "")
    page.fill("#preset-frames", "10")
    save_and_expect(page, 200)
    wait_for_row(page, "preset-own-video", name, Seconds="", Frames="10")
    stored = client.get(f"/v1/presets/{name}").json()
    assert (stored["seconds"], stored["num_frames"]) == (None, 10)
    # A video preset is not an image style: it is not offered on Generate.
    page.goto("/#/generate")
    page.wait_for_selector("#gen-style option[value='photographic']", state="attached")
    assert name not in [value for value, _ in style_options(page)]

    page.goto("/#/presets")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Delete {name}").click()
    page.wait_for_selector(f"#preset-own-video tr[data-preset='{name}']", state="detached")
    assert client.get(f"/v1/presets/{name}").status_code == 404


def test_the_presets_page_fits_a_phone(page):
    page.set_viewport_size({"width": 375, "height": 800})
    page.goto("/#/presets")
    page.wait_for_selector("#preset-builtin tr[data-preset='photographic']")
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    page.select_option("#preset-kind", "video")
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
