"""Every bad input is a 4xx in the one error shape, naming the field; never a 5xx."""

from __future__ import annotations

import uuid

import pytest

from tests.serve.helpers import assert_error, noise_image

pytestmark = pytest.mark.serve

VALID = {"prompt": "a cat", "size": "64x64", "steps": 2}


@pytest.mark.parametrize("override, param", [
    ({"n": 3}, "n"),
    ({"n": 0}, "n"),
    ({"size": "7x7"}, "size"),
    ({"size": "100000x100000"}, "size"),
    ({"size": "big"}, "size"),
    ({"steps": -1}, "steps"),
    ({"steps": 10_000}, "steps"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"model": "dall-e-9"}, "model"),
    ({"style": "no-such-style"}, "style"),
    ({"seed": -5}, "seed"),
    ({"response_format": "gif"}, "response_format"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_bad_generation_parameters(client, override, param):
    assert_error(client.post("/v1/images/generations", json={**VALID, **override}), 400, param)


def test_an_unknown_lora_is_a_404_model_not_found(client):
    error = assert_error(client.post("/v1/images/generations", json={**VALID, "lora": "no-such-lora"}), 404, "lora")
    assert error["code"] == "model_not_found" and "no-such-lora" in error["message"]


@pytest.mark.parametrize("async_", [False, True])
def test_bad_input_is_refused_before_a_job_is_made(client, async_):
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    response = client.post("/v1/images/generations", params={"async": async_}, json={**VALID, "n": 3})
    assert_error(response, 400, "n")
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before


def test_malformed_json_and_missing_prompt(client):
    response = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, None)
    assert_error(client.post("/v1/images/generations", json={"n": 1}), 400, "prompt")


def test_non_image_upload(client):
    response = client.post("/v1/images/edits", files={"image": ("x.png", b"this is text, not a PNG", "image/png")},
                           data={"prompt": "x"})
    assert_error(response, 400, "image")


def test_mask_of_the_wrong_size(client):
    response = client.post("/v1/images/edits", files={
        "image": ("in.png", noise_image(64, 64), "image/png"),
        "mask": ("mask.png", noise_image(32, 32, mode="L"), "image/png")}, data={"prompt": "x"})
    error = assert_error(response, 400, "mask")
    assert "32x32" in error["message"] and "64x64" in error["message"]


def test_missing_image_upload(client):
    assert_error(client.post("/v1/images/edits", data={"prompt": "x"}, files={"mask": ("m.png", b"x", "image/png")}),
                 400, "image")


def test_fifty_megabyte_upload_is_413(client):
    big = b"\0" * (50 * 1024 * 1024)
    response = client.post("/v1/images/edits", files={"image": ("big.png", big, "image/png")}, data={"prompt": "x"})
    error = assert_error(response, 413, "image")
    assert "limit" in error["message"]


def test_unknown_job_id(client):
    assert_error(client.get("/v1/jobs/job_doesnotexist"), 404, "job_id")
    assert_error(client.get("/v1/jobs/..%2F..%2Fetc%2Fpasswd"), 404, None)
    assert_error(client.post("/v1/jobs/job_doesnotexist/cancel"), 404, "job_id")
    assert_error(client.get("/v1/jobs/job_doesnotexist/events"), 404, "job_id")


def test_file_outside_outputs_or_traversal_is_404(client):
    assert_error(client.get("/v1/files/jobs/anything.json"), 404, "key")
    assert_error(client.get("/v1/files/outputs/../jobs/x.json"), 404, None)
    assert_error(client.get("/v1/files/outputs/none.png"), 404, "key")


def test_unknown_route_has_the_error_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404, None)


# --- JSON nested too deeply: json.loads recurses once per level and raises RecursionError ---------

DEEP_JSON = "[" * 100_000


@pytest.mark.parametrize("path", [
    "/v1/workflows/validate",   # parsed by the route (deployments.errors.parse_json)
    "/v1/workflows/runs",
    "/v1/workflows",
    "/v1/videos",
    "/v1/images/upscale",
    "/v1/images/generations",   # parsed by FastAPI into the request model
])
def test_json_body_nested_too_deeply_is_400_naming_the_body(client, path):
    before = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    response = client.post(path, content=DEEP_JSON.encode(), headers={"content-type": "application/json"})
    error = assert_error(response, 400, "body")
    assert error["type"] == "invalid_request_error", error
    assert client.get("/v1/jobs", params={"limit": 100}).json()["data"] == before  # no job was made


def test_dataset_upload_with_tags_nested_too_deeply_is_400_naming_tags(client):
    created = client.post("/v1/datasets", json={"name": f"deep-{uuid.uuid4().hex[:8]}"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    response = client.post(f"/v1/datasets/{dataset_id}/images", data={"tags": DEEP_JSON},
                           files=[("files", ("a.png", noise_image(32, 32), "image/png"))])
    error = assert_error(response, 400, "tags")
    assert error["type"] == "invalid_request_error", error
    assert client.get(f"/v1/datasets/{dataset_id}").json()["images"] == 0  # nothing was added
