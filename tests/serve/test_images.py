"""Images through the real HTTP ingress on the tiny SDXL (configs/local.yaml on a local Ray)."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.helpers import assert_error, decode_b64_png, noise_image

pytestmark = pytest.mark.serve


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_text_to_image_returns_n_pngs_of_the_requested_size(client, n):
    response = client.post("/v1/images/generations", json={
        "prompt": "a lighthouse at dusk", "n": n, "size": "64x48", "steps": 2,
        "seed": 7, "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == n
    images = [decode_b64_png(item["b64_json"]) for item in body["data"]]
    assert all(image.size == (64, 48) for image in images)
    assert [item["seed"] for item in body["data"]] == list(range(7, 7 + n))
    if n > 1:  # per-image seeds: the images differ
        assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(client):
    def generate(seed):
        body = client.post("/v1/images/generations", json={
            "prompt": "a red bicycle", "size": "64x64", "steps": 3, "seed": seed,
            "response_format": "b64_json"}).json()
        return body["data"][0]["b64_json"]

    first, again, other = generate(42), generate(42), generate(43)
    assert first == again
    assert first != other


def test_image_i_of_a_batch_equals_image_0_at_seed_plus_i(client):
    batch = client.post("/v1/images/generations", json={
        "prompt": "a fox", "n": 2, "size": "64x64", "steps": 2, "seed": 100, "response_format": "b64_json"}).json()
    single = client.post("/v1/images/generations", json={
        "prompt": "a fox", "n": 1, "size": "64x64", "steps": 2, "seed": 101, "response_format": "b64_json"}).json()
    a = np.asarray(decode_b64_png(batch["data"][1]["b64_json"]), dtype=np.int16)
    b = np.asarray(decode_b64_png(single["data"][0]["b64_json"]), dtype=np.int16)
    assert np.abs(a - b).max() <= 1  # batch size may change float rounding by one level at most


def test_url_response_serves_the_png(client):
    body = client.post("/v1/images/generations", json={
        "prompt": "a teapot", "n": 2, "size": "64x64", "steps": 2, "seed": 1}).json()
    for item in body["data"]:
        assert item["url"].startswith(str(client.base_url)), item["url"]
        fetched = httpx.get(item["url"], timeout=30)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(fetched.content))
        assert image.size == (64, 64)
        assert image.text["seed"] == str(item["seed"])  # lineage in PNG text chunks


def test_style_preset_is_applied(client):
    body = client.post("/v1/images/generations", json={
        "prompt": "a castle", "style": "anime", "size": "64x64", "steps": 2, "seed": 3,
        "response_format": "b64_json"}).json()
    assert body["data"][0]["revised_prompt"].startswith("anime artwork of a castle")


def test_image_to_image(client):
    files = {"image": ("in.png", noise_image(64, 64), "image/png")}
    data = {"prompt": "make it blue", "n": "2", "strength": "0.6", "steps": "4", "seed": "5",
            "response_format": "b64_json"}
    response = client.post("/v1/images/edits", files=files, data=data)
    assert response.status_code == 200, response.text
    images = [decode_b64_png(item["b64_json"]) for item in response.json()["data"]]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    again = client.post("/v1/images/edits", files=files, data=data).json()
    assert again["data"][0]["b64_json"] == response.json()["data"][0]["b64_json"]


def test_inpainting_keeps_size_and_changes_the_masked_area(client):
    source = noise_image(64, 64, seed=1)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    mask_png = io.BytesIO()
    Image.fromarray(mask, "L").save(mask_png, format="PNG")
    response = client.post("/v1/images/edits", files={
        "image": ("in.png", source, "image/png"), "mask": ("mask.png", mask_png.getvalue(), "image/png")},
        data={"prompt": "a window", "steps": "4", "seed": "9", "strength": "1.0", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    out = np.asarray(decode_b64_png(response.json()["data"][0]["b64_json"]), dtype=np.int16)
    src = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"), dtype=np.int16)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[24:40, 24:40] - src[24:40, 24:40]).mean() > 10  # repainted inside the mask


def test_models_lists_sdxl_with_limits_and_styles(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    sdxl = next(model for model in body["data"] if model["id"] == "sdxl")
    assert "images.generations" in sdxl["capabilities"]
    assert sdxl["metadata"]["allowed_n"] == [1, 2, 4, 8]
    assert "anime" in sdxl["metadata"]["styles"]


def test_healthz_and_openapi_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/v1/images/edits", "/v1/jobs/{job_id}"} <= set(paths)


def test_response_carries_only_the_requested_format(client):
    body = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1}).json()
    assert "url" in body["data"][0] and "b64_json" not in body["data"][0]
    body = client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64", "steps": 1,
                                                        "response_format": "b64_json"}).json()
    assert "b64_json" in body["data"][0] and "url" not in body["data"][0]
