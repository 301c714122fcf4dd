"""The gallery's asset library in headless Chromium against the real app (issue 22): search, tag,
favourite (one output of a 2-image job alone) and delete, each checked against the API's answer
afterwards.

Reuses the package's app (tests/serve/conftest.py `atelier`) and browser; three tiny 2-step jobs.
"""

from __future__ import annotations

import uuid

import pytest
from tests.serve.helpers import wait_for_job

pytestmark = pytest.mark.serve


def make_image(client, prompt: str, n: int = 1) -> dict:
    made = client.post("/v1/images/generations?async=true",
                       json={"prompt": prompt, "size": "64x64", "steps": 2, "seed": 5, "n": n})
    assert made.status_code == 202, made.text
    job = wait_for_job(client, made.json()["id"])
    assert job["status"] == "completed", job
    return job


def submit(page) -> None:
    """Search, and wait until its cards are in (the grid is aria-busy while a search runs): a card
    read, or a delete confirmed, before that would be the old grid's (CI 2026-12-04: the rebuilt
    grid took the delete's confirm button away)."""
    with page.expect_response(lambda r: r.request.method == "GET" and "/v1/assets?" in r.url):
        page.click("#gallery-search-submit")
    page.wait_for_selector("#gallery-grid[aria-busy='false']", state="attached")


def search(page, **fields: str) -> None:
    page.fill("#gallery-q", fields.get("q", ""))
    if "tag" in fields:
        page.locator("#gallery-tag option", has_text=fields["tag"]).first.wait_for(state="attached")
        page.select_option("#gallery-tag", fields["tag"])
    submit(page)


def test_search_tag_favourite_and_delete_in_the_gallery(page, client):
    token = uuid.uuid4().hex[:10]
    harbour = make_image(client, f"gallery {token}harbour at night")
    meadow = make_image(client, f"gallery {token}meadow at noon")
    pair = make_image(client, f"gallery {token}lanterns in pairs", n=2)
    card = f"#gallery-grid article[data-job='{harbour['id']}']"
    other = f"#gallery-grid article[data-job='{meadow['id']}']"

    page.goto("/#/gallery")
    # search: a prompt word (as a prefix) finds one job, not the other
    search(page, q=f"{token}harb")
    page.wait_for_selector(card)
    page.wait_for_selector(other, state="detached")
    search(page, q=token)
    page.wait_for_selector(other)

    # tag and favourite the harbour, from its card (its one output)
    page.fill(f"{card} .tag-input", "Night Shots")
    page.click(f"{card} .tag-add")
    page.wait_for_selector(f"{card} .tags li:has-text('night shots')")
    page.click(f"{card} .favorite")
    page.wait_for_selector(f"{card} .favorite[aria-pressed='true']")
    asset = client.get(f"/v1/jobs/{harbour['id']}/asset").json()
    assert asset["outputs"][0]["tags"] == ["night shots"] and asset["outputs"][0]["favorite"] is True

    # search by the tag (its option appears once tagged): only the harbour
    search(page, q=token, tag="night shots")
    page.wait_for_selector(other, state="detached")
    assert page.locator(card).count() == 1
    page.check("#gallery-favorites")
    submit(page)
    page.wait_for_selector(card)

    # delete (two clicks): the card goes, and so do the job and its file
    page.click(f"{card} .delete")
    page.click(f"{card} .delete.confirm")
    page.wait_for_selector(card, state="detached")
    assert "Deleted" in page.text_content("#gallery-result")
    assert client.get(f"/v1/jobs/{harbour['id']}").status_code == 404
    assert client.get(f"/v1/files/{harbour['outputs'][0]['key']}").status_code == 404
    assert client.get(f"/v1/jobs/{meadow['id']}").json()["status"] == "completed"
    page.click("#gallery-search-clear")
    search(page, q=token)
    page.wait_for_selector(other)
    assert page.locator(card).count() == 0

    # a 2-image job: each image is a card; favourite the second alone
    first, second = (f"#gallery-grid article[data-job='{pair['id']}'][data-output='{i}']" for i in (0, 1))
    search(page, q=f"{token}lantern")
    page.wait_for_selector(first)
    page.click(f"{second} .favorite")
    page.wait_for_selector(f"{second} .favorite[aria-pressed='true']")
    assert page.get_attribute(f"{first} .favorite", "aria-pressed") == "false"
    asset = client.get(f"/v1/jobs/{pair['id']}/asset").json()
    assert asset["favorite"] is False and [o["favorite"] for o in asset["outputs"]] == [False, True]
    # favourites only: the job matches by its second image, and only that image's card shows
    page.check("#gallery-favorites")
    submit(page)
    page.wait_for_selector(first, state="detached")
    assert page.locator(second).count() == 1
