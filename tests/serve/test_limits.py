"""Every input limit, at it and one past it.

At the limit a request succeeds (or is accepted as a job); one past it is a 4xx in the error
shape naming the field. The limits are read from the running app (GET /v1/models, the
deployments' `describe()`) or its config (configs/local.yaml over the config models' defaults),
never restated here, so a changed limit moves the tests with it.

Kept cheap for a shared app on 2 cores: generations run at the smallest size with 1 step, and
a job that is only there to show it was accepted is cancelled at once.
"""

from __future__ import annotations

import base64
import http.server
import json
import struct
import threading
import uuid
import zlib
from pathlib import Path

import httpx
import pytest
import yaml

from api.config import IngressConfig
from deployments.media import decode_mp4
from storage.url_import import DatasetImportConfig
from tests.serve.helpers import assert_error, decode_b64_png, noise_image, wait_for_job

pytestmark = pytest.mark.serve

LOCAL_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


# --- where the limits come from ------------------------------------------------------------------


def ingress_config() -> IngressConfig:
    """The ingress config the test app runs: configs/local.yaml's `ingress` args over the defaults
    (the serve conftest changes only dataset_import's allow-list, never a limit)."""
    app = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    return IngressConfig.model_validate({"queue": app["queue"], **app.get("ingress", {})})


@pytest.fixture(scope="module")
def limits() -> IngressConfig:
    return ingress_config()


@pytest.fixture(scope="module")
def sdxl(atelier) -> dict:
    with httpx.Client(base_url=atelier.base_url, timeout=60) as http:
        models = http.get("/v1/models").json()["data"]
    return next(m["metadata"] for m in models if m["kind"] == "image")


@pytest.fixture(scope="module")
def context_length(atelier) -> int:
    with httpx.Client(base_url=atelier.base_url, timeout=60) as http:
        models = http.get("/v1/models").json()["data"]
    return next(m["metadata"]["max_model_len"] for m in models if m["kind"] == "text")


@pytest.fixture(scope="module")
def described(atelier) -> dict[str, dict]:
    """`describe()` of the SVD and upscaler deployments (their limits are not in GET /v1/models)."""
    if atelier.process is None and not getattr(atelier, "_address", None):
        pytest.skip("an attached app without its Ray address (ATELIER_TEST_APP=BASE_URL,RAY_ADDRESS)")
    ray = atelier.connect_ray()
    from ray import serve

    described = {}
    try:
        for name, deployment in (("svd", "SVDDeployment"), ("upscaler", "UpscalerDeployment")):
            describe = serve.get_deployment_handle(deployment, app_name="atelier").describe
            try:
                described[name] = describe.remote().result()
            finally:
                describe.shutdown()  # its router's metrics pusher would outlive the Ray connection
    finally:
        ray.shutdown()
    return described


# --- helpers -----------------------------------------------------------------------------------------


def png_of_size(total_bytes: int, width: int = 64, height: int = 64) -> bytes:
    """A valid PNG of exactly `total_bytes`: a noise image padded with a private ancillary chunk
    (decoders skip it), so size limits can be hit to the byte with a real image."""
    png = noise_image(width, height, seed=3)
    pad = total_bytes - len(png) - 12  # a chunk is length (4) + type (4) + data + CRC (4)
    assert pad >= 0, "the image alone is larger than the requested size"
    data = b"\0" * pad
    chunk = struct.pack(">I", pad) + b"atLr" + data + struct.pack(">I", zlib.crc32(b"atLr" + data))
    out = png[:-12] + chunk + png[-12:]  # before IEND
    assert len(out) == total_bytes
    return out


def accepted_then_cancelled(client: httpx.Client, response: httpx.Response) -> dict:
    """A 202 job, cancelled at once so it does not load the shared app."""
    assert response.status_code == 202, response.text
    job = response.json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] in ("cancelled", "in_progress", "completed")
    return job


def assert_no_new_job(client: httpx.Client, before: list[str]) -> None:
    assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 1}).json()["data"]] == before


def newest_job(client: httpx.Client) -> list[str]:
    return [j["id"] for j in client.get("/v1/jobs", params={"limit": 1}).json()["data"]]


# --- image size (SDXL) -------------------------------------------------------------------------------


def test_image_sides_at_the_model_limits_are_generated(client, sdxl):
    low, high = sdxl["min_size"], sdxl["max_size"]
    for width, height in ((high, low), (low, high)):  # one side at the max, the other at the min: cheap
        response = client.post("/v1/images/generations", json={
            "prompt": "a long strip", "size": f"{width}x{height}", "steps": 1, "seed": 1,
            "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        assert response.json()["size"] == f"{width}x{height}"
        assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (width, height)


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("async_", [False, True])
def test_image_side_past_the_model_limits_is_refused(client, sdxl, side, async_):
    low, high = sdxl["min_size"], sdxl["max_size"]
    before = newest_job(client)
    for bad in (high + 8, low - 8):
        size = f"{bad}x{low}" if side == "width" else f"{low}x{bad}"
        response = client.post("/v1/images/generations", params={"async": async_},
                               json={"prompt": "x", "size": size, "steps": 1})
        error = assert_error(response, 400, "size")
        assert str(high if bad > high else low) in error["message"]
    assert_no_new_job(client, before)


def test_edit_input_at_the_model_pixel_limit_passes_and_past_it_is_refused(client, sdxl):
    """SDXL takes inputs of at most max_size² pixels; the ingress refuses larger ones up front,
    also as a job (it used to accept the job, which then failed)."""
    high, low = sdxl["max_size"], sdxl["min_size"]
    at_limit = noise_image(high, high, seed=2)
    response = client.post("/v1/images/edits", files={"image": ("in.png", at_limit, "image/png")}, data={
        "prompt": "x", "size": f"{low}x{low}", "steps": "2", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (low, low)

    before = newest_job(client)
    past = noise_image(high, high + 1, seed=2)
    for async_ in (False, True):
        response = client.post("/v1/images/edits", params={"async": async_},
                               files={"image": ("in.png", past, "image/png")},
                               data={"prompt": "x", "size": f"{low}x{low}", "steps": "2"})
        error = assert_error(response, 400, "image")
        assert str(high * high) in error["message"]
    assert_no_new_job(client, before)


# --- upload bytes -------------------------------------------------------------------------------------


def test_upload_of_exactly_max_upload_bytes_is_edited(client, limits):
    image = png_of_size(limits.max_upload_bytes)
    response = client.post("/v1/images/edits", files={"image": ("exact.png", image, "image/png")},
                           data={"prompt": "x", "steps": "2", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (64, 64)


def test_upload_one_byte_over_max_upload_bytes_is_413(client, limits):
    image = png_of_size(limits.max_upload_bytes + 1)
    response = client.post("/v1/images/edits", files={"image": ("over.png", image, "image/png")},
                           data={"prompt": "x", "steps": "2"})
    error = assert_error(response, 413, "image")
    assert str(limits.max_upload_bytes) in error["message"]


def test_json_body_of_exactly_max_upload_bytes_is_accepted_and_one_more_is_413(client, limits):
    """A JSON body (an upscale with a data: URL) counts whole against max_upload_bytes."""
    data_url = "data:image/png;base64," + base64.b64encode(noise_image(32, 32, seed=4)).decode()
    body = json.dumps({"image_url": data_url, "steps": 1}).encode()
    exact = body + b" " * (limits.max_upload_bytes - len(body))  # JSON allows trailing whitespace
    headers = {"content-type": "application/json"}
    accepted_then_cancelled(client, client.post("/v1/images/upscale", params={"async": "true"}, content=exact,
                                                headers=headers))
    before = newest_job(client)
    response = client.post("/v1/images/upscale", params={"async": "true"}, content=exact + b" ", headers=headers)
    assert_error(response, 413, "image")
    assert_no_new_job(client, before)


def test_dataset_upload_at_and_over_max_upload_bytes(client, limits):
    dataset = client.post("/v1/datasets", json={"name": f"limits-{uuid.uuid4().hex[:8]}"}).json()
    try:
        at_limit = png_of_size(limits.max_upload_bytes)
        response = client.post(f"/v1/datasets/{dataset['id']}/images",
                               files=[("files", ("exact.png", at_limit, "image/png"))])
        assert response.status_code == 200, response.text
        assert response.json()["added"] == 1
        over = png_of_size(limits.max_upload_bytes + 1, width=48)
        response = client.post(f"/v1/datasets/{dataset['id']}/images",
                               files=[("files", ("over.png", over, "image/png"))])
        assert_error(response, 413, "files")
        assert client.get(f"/v1/datasets/{dataset['id']}").json()["images"] == 1
    finally:
        client.delete(f"/v1/datasets/{dataset['id']}", params={"confirm": dataset["name"]})


# --- n and steps ------------------------------------------------------------------------------------


def test_n_at_the_max_gives_that_many_images_and_one_more_is_refused(client, sdxl):
    most = max(sdxl["allowed_n"])
    size = sdxl["min_size"]
    response = client.post("/v1/images/generations", json={
        "prompt": "a grid", "n": most, "size": f"{size}x{size}", "steps": 1, "seed": 5,
        "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    images = [decode_b64_png(item["b64_json"]) for item in response.json()["data"]]
    assert len(images) == most and all(image.size == (size, size) for image in images)
    assert [item["seed"] for item in response.json()["data"]] == list(range(5, 5 + most))

    assert_error(client.post("/v1/images/generations", json={"prompt": "x", "n": most + 1}), 400, "n")
    response = client.post("/v1/images/edits", files={"image": ("in.png", noise_image(64, 64), "image/png")},
                           data={"prompt": "x", "n": str(most + 1)})
    assert_error(response, 400, "n")


def test_steps_at_the_max_run_and_one_more_is_refused(client, sdxl):
    size = sdxl["min_size"]
    response = client.post("/v1/images/generations", json={
        "prompt": "many steps", "size": f"{size}x{size}", "steps": sdxl["max_steps"], "seed": 2,
        "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert response.json()["steps"] == sdxl["max_steps"]
    assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (size, size)

    past = sdxl["max_steps"] + 1
    error = assert_error(client.post("/v1/images/generations", json={"prompt": "x", "steps": past}), 400, "steps")
    assert str(sdxl["max_steps"]) in error["message"]
    response = client.post("/v1/images/edits", files={"image": ("in.png", noise_image(64, 64), "image/png")},
                           data={"prompt": "x", "steps": str(past)})
    assert_error(response, 400, "steps")


@pytest.mark.parametrize("async_", [False, True])
def test_edit_steps_at_the_low_end_denoise_at_least_once(client, async_):
    """An edit denoises int(steps × strength) steps: at strength 0.5, 2 steps is one (the fewest),
    1 step is none, which used to fail inside the pipeline (500, or a failed job)."""
    image = {"image": ("in.png", noise_image(64, 64, seed=12), "image/png")}
    fields = {"prompt": "x", "strength": "0.5", "response_format": "b64_json"}
    response = client.post("/v1/images/edits", params={"async": async_}, files=image, data={**fields, "steps": "2"})
    if async_:
        assert response.status_code == 202, response.text
        final = wait_for_job(client, response.json()["id"])
        assert final["status"] == "completed" and len(final["outputs"]) == 1, final["error"]
    else:
        assert response.status_code == 200, response.text
        assert decode_b64_png(response.json()["data"][0]["b64_json"]).size == (64, 64)
    before = newest_job(client)
    error = assert_error(client.post("/v1/images/edits", params={"async": async_}, files=image,
                                     data={**fields, "steps": "1"}), 400, "steps")
    assert "strength" in error["message"]
    assert_no_new_job(client, before)


def test_video_and_upscale_steps_at_the_max_are_accepted_and_one_more_is_refused(client, described):
    svd, upscaler = described["svd"], described["upscaler"]
    image = {"input_reference": ("in.png", noise_image(64, 64, seed=6), "image/png")}
    accepted_then_cancelled(client, client.post("/v1/videos", files=image, data={
        "num_frames": "1", "size": "64x64", "steps": str(svd["max_steps"])}))
    assert_error(client.post("/v1/videos", files=image, data={
        "num_frames": "1", "size": "64x64", "steps": str(svd["max_steps"] + 1)}), 400, "steps")

    small = {"image": ("small.png", noise_image(upscaler["min_input_size"], upscaler["min_input_size"]), "image/png")}
    accepted_then_cancelled(client, client.post("/v1/images/upscale", params={"async": "true"}, files=small,
                                                data={"steps": str(upscaler["max_steps"])}))
    assert_error(client.post("/v1/images/upscale", params={"async": "true"}, files=small,
                             data={"steps": str(upscaler["max_steps"] + 1)}), 400, "steps")


# --- video frames and size -----------------------------------------------------------------------------


def test_video_of_the_max_frames_has_that_many_frames(client, described):
    most = described["svd"]["max_num_frames"]
    image = {"input_reference": ("in.png", noise_image(64, 64, seed=8), "image/png")}
    response = client.post("/v1/videos", files=image,
                           data={"num_frames": str(most), "size": "64x64", "steps": "1", "seed": "3"})
    assert response.status_code == 202, response.text
    video = response.json()
    assert video["num_frames"] == most
    final = wait_for_job(client, video["id"], timeout_s=300)
    assert final["status"] == "completed", final
    mp4 = client.get(f"/v1/videos/{video['id']}/content", follow_redirects=True)
    assert mp4.status_code == 200
    frames, _ = decode_mp4(mp4.content)
    assert len(frames) == most and frames[0].size == (64, 64)


def test_video_frames_past_the_max_are_refused(client, described):
    svd = described["svd"]
    most = svd["max_num_frames"]
    image = {"input_reference": ("in.png", noise_image(64, 64, seed=8), "image/png")}
    before = newest_job(client)
    error = assert_error(client.post("/v1/videos", files=image, data={"num_frames": str(most + 1), "size": "64x64"}),
                         400, "num_frames")
    assert str(most) in error["message"]
    # seconds past one clip is a chain of clips, up to max_seconds; past that it is refused
    assert_error(client.post("/v1/videos", files=image, data={"seconds": str(svd["max_seconds"] + 1)}),
                 400, "seconds")
    assert_no_new_job(client, before)


def test_video_seconds_and_size_at_the_limits_are_accepted(client, described):
    svd = described["svd"]
    most, fps, high = svd["max_num_frames"], svd["default_fps"], svd["max_size"]
    image = {"input_reference": ("in.png", noise_image(64, 64, seed=9), "image/png")}
    video = accepted_then_cancelled(client, client.post("/v1/videos", files=image, data={
        "seconds": str(most / fps), "fps": str(fps), "size": f"{high}x{high}", "steps": "1"}))
    assert (video["num_frames"], video["size"]) == (most, f"{high}x{high}")
    for size in (f"{high + 8}x{high}", f"{high}x{high + 8}"):
        assert_error(client.post("/v1/videos", files=image, data={"num_frames": "1", "size": size}), 400, "size")


# --- LLM tokens ----------------------------------------------------------------------------------------


def completion(client, prompt, max_tokens=None) -> httpx.Response:
    body = {"model": "gemma", "prompt": prompt, "temperature": 0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return client.post("/v1/completions", json=body)


def test_max_tokens_at_the_context_length_is_served_within_it(client, context_length):
    prompt = [5, 6, 7, 8]  # token ids: the prompt is exactly 4 tokens
    response = completion(client, prompt, max_tokens=context_length)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == len(prompt)
    assert 1 <= usage["completion_tokens"] <= context_length - len(prompt)
    assert usage["total_tokens"] <= context_length


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_max_tokens_past_the_context_length_is_refused(client, context_length, route):
    body = {"model": "gemma", "max_tokens": context_length + 1}
    body |= {"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    error = assert_error(client.post(route, json=body), 400, "max_tokens")
    assert str(context_length) in error["message"]


def test_prompt_that_leaves_one_token_of_context_is_served(client, context_length):
    prompt = [5] * (context_length - 1)
    response = completion(client, prompt, max_tokens=1)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (context_length - 1, 1)


@pytest.mark.parametrize("extra", [0, 1])
@pytest.mark.parametrize("max_tokens", [None, 1])
def test_prompt_that_fills_the_context_is_refused_naming_the_prompt(client, context_length, extra, max_tokens):
    """A prompt of the whole context leaves no room for output: the prompt is at fault, not
    max_tokens (vLLM blamed max_tokens, which the client had not even sent)."""
    response = completion(client, [5] * (context_length + extra), max_tokens=max_tokens)
    error = assert_error(response, 400, "prompt")
    assert str(context_length) in error["message"]


# --- workflow nodes ------------------------------------------------------------------------------------


def workflow_of(nodes: int) -> dict:
    """`nodes` nodes, all valid: prompts, each feeding one or two outputs."""
    prompts = nodes // 2
    outputs = nodes - prompts
    doc = {"nodes": [{"id": f"p{i}", "type": "prompt", "params": {"text": f"idea {i}"}} for i in range(prompts)]
           + [{"id": f"o{i}", "type": "output"} for i in range(outputs)],
           "edges": [{"source": f"p{i % prompts}", "source_port": "text", "target": f"o{i}", "target_port": "value"}
                     for i in range(outputs)]}
    assert len(doc["nodes"]) == nodes
    return doc


def test_workflow_of_the_max_nodes_validates_and_runs(client, limits):
    most = limits.max_workflow_nodes
    report = client.post("/v1/workflows/validate", json=workflow_of(most))
    assert report.status_code == 200, report.text
    assert report.json()["valid"] is True, report.json()["errors"][:3]
    assert len(report.json()["order"]) == most

    response = client.post("/v1/workflows/runs", json={"workflow": workflow_of(most), "use_cache": False})
    assert response.status_code == 202, response.text
    final = wait_for_job(client, response.json()["id"], timeout_s=180)
    assert final["status"] == "completed", final["error"]
    nodes = final["result"]["nodes"]
    assert len(nodes) == most and all(node["status"] == "completed" for node in nodes.values())


def test_workflow_of_one_more_node_is_refused(client, limits):
    most = limits.max_workflow_nodes
    report = client.post("/v1/workflows/validate", json=workflow_of(most + 1)).json()
    assert report["valid"] is False
    assert [(e["node"], e["field"]) for e in report["errors"]] == [(None, "nodes")]
    assert str(most) in report["errors"][0]["message"]

    before = newest_job(client)
    response = client.post("/v1/workflows/runs", json={"workflow": workflow_of(most + 1)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert {"type", "message", "param"} <= set(error) and error["param"] == "nodes"
    response = client.post("/v1/workflows", json={"name": "too big", "workflow": workflow_of(most + 1)})
    assert response.status_code == 400 and response.json()["error"]["param"] == "nodes", response.text
    assert_no_new_job(client, before)


# --- dataset URL imports -------------------------------------------------------------------------------


class _Files(http.server.BaseHTTPRequestHandler):
    """`/img/<n>.png` a small image (the same bytes for every n); `/bytes/<n>.png` a PNG of exactly
    n bytes, with Content-Length; `/stream/<n>.png` the same without it (read to the end)."""

    small = noise_image(16, 16, seed=11)

    def do_GET(self):  # noqa: N802
        kind, name = self.path.strip("/").split("/", 1)
        body = self.small if kind == "img" else png_of_size(int(name.split(".")[0]))
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        if kind != "stream":
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def file_server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def dataset(client):
    dataset = client.post("/v1/datasets", json={"name": f"limits-{uuid.uuid4().hex[:8]}"}).json()
    yield dataset
    client.delete(f"/v1/datasets/{dataset['id']}", params={"confirm": dataset["name"]})


def import_config() -> DatasetImportConfig:
    app = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]
    return DatasetImportConfig.model_validate(app.get("ingress", {}).get("dataset_import", {}))


def test_import_of_max_urls_fetches_every_one(client, dataset, file_server):
    most = import_config().max_urls
    urls = [f"{file_server}/img/{i}.png" for i in range(most)]
    response = client.post(f"/v1/datasets/{dataset['id']}/imports", json={"urls": urls})
    assert response.status_code == 202, response.text
    final = wait_for_job(client, response.json()["id"], timeout_s=300)
    assert final["status"] == "completed", final["error"]
    result = final["result"]
    # the same bytes at every URL: one image, and every other fetch seen as its duplicate
    assert (result["added"], result["duplicates"], result["rejected"]) == (1, most - 1, 0), result


def test_import_of_one_url_more_than_max_urls_is_refused(client, dataset, file_server):
    most = import_config().max_urls
    before = newest_job(client)
    urls = [f"{file_server}/img/{i}.png" for i in range(most + 1)]
    error = assert_error(client.post(f"/v1/datasets/{dataset['id']}/imports", json={"urls": urls}), 400, "urls")
    assert str(most) in error["message"]
    assert_no_new_job(client, before)


def test_import_takes_a_file_of_exactly_max_bytes_and_rejects_one_byte_more(client, dataset, file_server):
    """The per-file limit is applied while fetching (the import is a job), to a declared
    Content-Length and to a body without one alike; refused files are listed, the rest lands."""
    limit = import_config().max_bytes
    urls = [f"{file_server}/bytes/{limit}.png", f"{file_server}/bytes/{limit + 1}.png",
            f"{file_server}/stream/{limit + 1}.png"]
    response = client.post(f"/v1/datasets/{dataset['id']}/imports", json={"urls": urls})
    assert response.status_code == 202, response.text
    final = wait_for_job(client, response.json()["id"], timeout_s=300)
    assert final["status"] == "completed", final["error"]
    result = final["result"]
    assert (result["added"], result["rejected"]) == (1, 2), result
    rejected = {r["filename"]: r["reason"] for r in result["rejections"]}
    assert set(rejected) == set(urls[1:])
    assert all("over the limit" in reason and str(limit) in reason for reason in rejected.values()), rejected
