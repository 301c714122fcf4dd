"""The vision API over HTTP, with the app built as the ingress builds it (typed args, every
service) and a fake LLM deployment answering fixed JSON: POST /v1/images/judge, image content
parts on POST /v1/chat/completions, and moderation of prompts and outputs.

alice and bob are two tenants (`generate`, `train`); bob never reaches alice's files.
"""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from api.app import AtelierArgs, model_limits
from api.auth import ApiKey, Caller, acting_as, hash_key, reset_caller
from api.ingress import create_app
from api.services import build_services
from deployments.sdxl.contract import SDXLImage, SDXLResponse
from local.tiny_models import ensure_tiny_models
from storage.keys import output_key
from tests.keyed_app import LOCAL, REPO, FakeQueue, Unreachable, png
from tests.unit.test_vision_contract import images_of

KEYS = {"alice": ("alice-key", ["generate", "train"]), "bob": ("bob-key", ["generate", "train"])}
FLAG_WORD = "forbidden"  # a prompt holding it is refused (category "violence_graphic")


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FakeStream:
    def __init__(self, item):
        self.items = [item]
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeLLM:
    """The LLM deployment: records every chat request and answers by what it asks. A judgement
    gets the next of `scores` (round and round); a prompt verdict flags FLAG_WORD; an image verdict flags when
    `flag_images`; any other chat gets a plain answer."""

    def __init__(self, scores=(7,), flag_images=False):
        self.scores = list(scores)
        self.flag_images = flag_images
        self.requests = []

    def options(self, **_):
        return self

    @property
    def chat(self):
        return SimpleNamespace(remote=self._remote)

    def kinds(self) -> list[str]:
        return [self.kind(r) for r in self.requests]

    @staticmethod
    def kind(request) -> str:
        schema = getattr(request.response_format, "json_schema", None)
        return schema.name if schema else "chat"

    def content(self, request) -> str:
        kind = self.kind(request)
        if kind == "judgement":
            score = self.scores[(len([k for k in self.kinds() if k == "judgement"]) - 1) % len(self.scores)]
            return json.dumps({"score": score, "reasons": [f"scored {score}"], "defects": ["soft edges"],
                               "matches_prompt": score >= 5})
        if kind == "moderation":
            text = json.dumps(request.messages[-1]["content"])
            flagged = FLAG_WORD in text if "Prompt to classify" in text else self.flag_images
            return json.dumps({"flagged": flagged, "category": "violence_graphic" if flagged else "none"})
        return "I see a small picture."

    def _remote(self, request, raw_request):
        from ray.serve.llm.openai_api_models import ChatCompletionResponse

        self.requests.append(request)
        return FakeStream(ChatCompletionResponse.model_validate({
            "id": "chat-1", "created": 1, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.content(request)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))


class FakeSDXL:
    """Sync generate: PNGs back, or stored under the request's output id when it asks (as the replica)."""

    def __init__(self, storage):
        self.storage = storage
        self.requests = []

    def options(self, **_):
        return self

    @property
    def generate(self):
        async def remote(request):
            self.requests.append(request)
            images = []
            for i in range(request.n):
                image = SDXLImage(seed=3 + i, width=64, height=64)
                if request.store:
                    image.key = self.storage.put_bytes(output_key(request.output_id, i), png(seed=50 + i))
                else:
                    image.png = png(seed=50 + i)
                images.append(image)
            return SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt, negative_prompt="", steps=2,
                                guidance_scale=5.0, images=images, batch_images=request.n, elapsed_s=0.1)

        return SimpleNamespace(remote=remote)


def build(tmp_path, moderation: dict | None = None, llm: bool = True, **fake) -> SimpleNamespace:
    tiny = ensure_tiny_models(REPO / "models" / "tiny")
    sections = {
        "storage_root": str(tmp_path / "storage"),
        "queue": {"broker_url": "memory://", "backend_url": "cache+memory://"},
        "ingress": {"moderation": moderation or {}},
        "sdxl": {"model": str(tiny["sdxl"]), "default_size": 64, "min_size": 32, "max_size": 256,
                 "default_steps": 2, "max_steps": 50},
        "svd": {"model": str(tiny["svd"]), "default_width": 64, "default_height": 64, "min_size": 32,
                "max_size": 256, "default_steps": 2, "max_steps": 50},
        "upscaler": {"model": str(tiny["upscaler"]), "min_input_size": 16, "max_input_size": 256,
                     "default_steps": 2, "max_steps": 50},
    }
    if llm:
        sections["llm"] = {"model_source": "tiny-gemma", "model_id": "gemma", "max_model_len": 2048, "max_images": 2,
                           "judge": {"max_images": 3}}
    args = AtelierArgs.model_validate(sections)
    limits = model_limits(args)
    handles = {name: Unreachable(name) for name in limits}
    from storage.fs import Storage

    storage = Storage(str(tmp_path / "storage"))
    fake_llm = FakeLLM(**fake)
    handles["sdxl"] = sdxl = FakeSDXL(storage)
    if llm:
        handles["llm"] = fake_llm
    queue = FakeQueue()
    services = build_services(args.ingress, handles, limits, queue=queue)
    keys = [ApiKey(name=name, sha256=hash_key(key), scopes=scopes) for name, (key, scopes) in KEYS.items()]
    client = TestClient(create_app(services, keys), base_url=LOCAL, raise_server_exceptions=False)
    return SimpleNamespace(client=client, services=services, storage=services.files.storage, llm=fake_llm, sdxl=sdxl,
                           queue=queue)


def alices_output(app, seed: int = 1) -> str:
    """A synchronous output of alice's (its id tagged with her tenant)."""
    token = acting_as(Caller(owner="alice"))
    try:
        return app.storage.put_bytes(output_key(app.services.files.output_id(), 0), png(seed=seed))
    finally:
        reset_caller(token)


@pytest.fixture
def app(tmp_path):
    return build(tmp_path, scores=(4, 9))


# --- POST /v1/images/judge -------------------------------------------------------------------------


def test_judge_scores_images_by_key_and_inline(app):
    key = alices_output(app, seed=1)
    inline = png(48, 48, seed=2)
    response = app.client.post("/v1/images/judge", headers=bearer("alice"), json={
        "images": [{"key": key}, {"b64_json": b64(inline)}], "prompt": "a lighthouse at dusk",
        "criteria": "the lamp is lit"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "gemma"
    assert [(d["index"], d.get("key"), d["score"], d["matches_prompt"]) for d in body["data"]] == [
        (0, key, 4, False), (1, None, 9, True)]
    assert body["data"][1]["reasons"] == ["scored 9"] and body["data"][1]["defects"] == ["soft edges"]
    # one request per image, each carrying exactly that image, under the judgement's schema
    assert app.llm.kinds() == ["judgement", "judgement"]
    assert [images_of(r) for r in app.llm.requests] == [[png(seed=1)], [inline]]
    assert "the lamp is lit" in app.llm.requests[0].messages[-1]["content"][-1]["text"]
    # the file URL this server gave works as the key too
    again = app.client.post("/v1/images/judge", headers=bearer("alice"), json={
        "images": [{"key": f"{LOCAL}/v1/files/{key}"}], "prompt": "a lighthouse"})
    assert again.status_code == 200 and again.json()["data"][0]["key"] == key, again.text


def test_judge_refuses_another_owners_key_as_unknown(app):
    key = alices_output(app)
    theirs = app.client.post("/v1/images/judge", headers=bearer("bob"),
                             json={"images": [{"key": key}], "prompt": "x"})
    missing = app.client.post("/v1/images/judge", headers=bearer("bob"),
                              json={"images": [{"key": key.replace(".png", "9.png")}], "prompt": "x"})
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "images.0.key", theirs.text
    assert missing.status_code == 404
    assert not app.llm.requests


@pytest.mark.parametrize("images, status, param", [
    ([{"b64_json": b64(b"not an image at all")}], 400, "images.0.b64_json"),
    ([{"b64_json": "%%%"}], 400, "images.0.b64_json"),
    ([{"b64_json": b64(png(seed=1))}, {"key": "uploads/x/image"}], 400, "images.1.key"),
    ([{"b64_json": b64(png(seed=1))}, {"key": "https://elsewhere.example/a.png"}], 400, "images.1.key"),
    ([{"b64_json": b64(png(seed=i))} for i in range(4)], 400, "images"),  # judge.max_images is 3
    ([{}], 400, "images.0"),
])
def test_judge_names_the_bad_image(app, images, status, param):
    response = app.client.post("/v1/images/judge", headers=bearer("alice"), json={"images": images, "prompt": "x"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
    assert not app.llm.requests


def test_judge_refuses_an_image_over_the_pixel_limit(tmp_path):
    app = build(tmp_path)
    app.services.vision.images.max_pixels = 32 * 32
    response = app.client.post("/v1/images/judge", headers=bearer("alice"),
                               json={"images": [{"b64_json": b64(png(64, 64))}], "prompt": "x"})
    assert response.status_code == 400 and "pixels" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "images.0.b64_json"
    app.services.vision.images.max_bytes = 100
    response = app.client.post("/v1/images/judge", headers=bearer("alice"),
                               json={"images": [{"b64_json": b64(png(16, 16))}], "prompt": "x"})
    assert response.status_code == 413 and response.json()["error"]["param"] == "images.0.b64_json"


def test_judge_without_a_language_model_is_a_404(tmp_path):
    app = build(tmp_path, llm=False)
    response = app.client.post("/v1/images/judge", headers=bearer("alice"),
                               json={"images": [{"b64_json": b64(png())}], "prompt": "x"})
    assert response.status_code == 404 and response.json()["error"]["type"] == "model_not_found", response.text


# --- image content parts on POST /v1/chat/completions --------------------------------------------


def chat(client, url: str, who: str = "alice", **extra):
    return client.post("/v1/chat/completions", headers=bearer(who), json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                     {"type": "image_url", "image_url": {"url": url}}]}], **extra})


def test_a_data_url_image_part_reaches_the_engine_as_a_data_url(app):
    image = png(40, 40, seed=7)
    answer = chat(app.client, f"data:image/png;base64,{b64(image)}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "I see a small picture."
    assert images_of(app.llm.requests[0]) == [image]


def test_a_stored_key_becomes_a_data_url_for_its_owner_only(app):
    key = alices_output(app, seed=4)
    for url in (key, f"/v1/files/{key}", f"{LOCAL}/v1/files/{key}"):
        answer = chat(app.client, url)
        assert answer.status_code == 200, (url, answer.text)
        assert images_of(app.llm.requests[-1]) == [png(seed=4)]
    sent = len(app.llm.requests)
    theirs = chat(app.client, key, who="bob")
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "messages.0.content.1.image_url.url"
    assert len(app.llm.requests) == sent


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "https://images.example.com/a.png",
                                 "file:///etc/passwd", "//evil.example/v1/files/outputs/a.png",
                                 f"http://other.example/v1/files/outputs/a.png", "ftp://x/y.png"])
def test_an_image_url_outside_this_server_is_refused_and_never_sent(app, url):
    answer = chat(app.client, url)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages.0.content.1.image_url.url" and "not fetched" in error["message"]
    assert not app.llm.requests


@pytest.mark.parametrize("url, status", [
    (f"data:image/png;base64,{b64(b'plain text, not a picture')}", 400),
    ("data:text/plain;base64,aGVsbG8=", 400),
    ("data:image/png,rawbytes", 400),
    ("data:image/png;base64,@@@", 400),
])
def test_a_data_url_that_is_not_an_image_is_refused(app, url, status):
    answer = chat(app.client, url)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == "messages.0.content.1.image_url.url"
    assert not app.llm.requests


def test_chat_refuses_other_media_parts_and_too_many_images(app):
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(png(16, 16))}"}}
    cases = [
        ([{"type": "audio_url", "audio_url": {"url": "http://x/a.wav"}}], "messages.0.content.0.type"),
        ([{"type": "video_url", "video_url": {"url": "http://x/a.mp4"}}], "messages.0.content.0.type"),
        ([{**image, "uuid": "someone-elses-image"}], "messages.0.content.0.uuid"),
        ([image, image, image], "messages.0.content.2.image_url.url"),  # llm.max_images is 2
    ]
    for content, param in cases:
        answer = app.client.post("/v1/chat/completions", headers=bearer("alice"),
                                 json={"messages": [{"role": "user", "content": content}]})
        assert answer.status_code == 400, (content, answer.text)
        assert answer.json()["error"]["param"] == param, answer.text
    assert not app.llm.requests
    # text-only chats are as before
    assert app.client.post("/v1/chat/completions", headers=bearer("alice"),
                           json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200


# --- moderation ------------------------------------------------------------------------------------


def refused(response, param: str = "prompt") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "content_policy_violation"
    assert error["category"] == "violence_graphic" and error["param"] == param
    assert "violence_graphic" in error["message"]


@pytest.fixture
def moderated(tmp_path):
    return build(tmp_path, moderation={"enabled": True})


def test_a_refused_prompt_stops_every_generation_before_it_runs(moderated):
    client, bad = moderated.client, f"a {FLAG_WORD} scene"
    refused(client.post("/v1/images/generations", headers=bearer("alice"), json={"prompt": bad, "size": "64x64"}))
    refused(client.post("/v1/images/generations?async=true", headers=bearer("alice"), json={"prompt": bad}))
    refused(client.post("/v1/images/edits", headers=bearer("alice"), data={"prompt": bad},
                        files={"image": ("a.png", png(), "image/png")}))
    refused(client.post("/v1/videos", headers=bearer("alice"), json={"prompt": bad, "seconds": "1", "fps": 4}))
    refused(client.post("/v1/prompts/refine", headers=bearer("alice"), json={"prompt": bad}))
    workflow = {"nodes": [{"id": "idea", "type": "prompt", "params": {"text": bad}},
                          {"id": "still", "type": "text_to_image", "params": {"size": "64x64", "steps": 2}},
                          {"id": "out", "type": "output", "params": {}}],
                "edges": [{"source": "idea", "source_port": "text", "target": "still", "target_port": "prompt"},
                          {"source": "still", "source_port": "images", "target": "out", "target_port": "value"}]}
    refused(client.post("/v1/workflows/runs", headers=bearer("alice"), json={"workflow": workflow}),
            "nodes.idea.params.text")
    assert not moderated.queue.sent and not moderated.sdxl.requests  # nothing ran, nothing was queued
    assert set(moderated.llm.kinds()) == {"moderation"}


def test_a_clean_prompt_passes_and_a_job_carries_the_output_check(moderated):
    made = moderated.client.post("/v1/images/generations?async=true", headers=bearer("alice"),
                                 json={"prompt": "a calm lake", "size": "64x64"})
    assert made.status_code == 202, made.text
    record = moderated.services.jobs.jobs.get(made.json()["id"])
    assert record.request["moderation"]["model"] == "gemma"
    assert record.request["moderation"]["settings"]["enabled"] is True
    # the same prompt again is not asked again (text-to-video checks its still's prompt twice)
    asked = len(moderated.llm.requests)
    assert moderated.client.post("/v1/images/generations?async=true", headers=bearer("alice"),
                                 json={"prompt": "a calm lake"}).status_code == 202
    assert len(moderated.llm.requests) == asked


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
def test_a_refused_output_is_a_400_and_never_stored(tmp_path, response_format):
    app = build(tmp_path, moderation={"enabled": True}, flag_images=True)
    response = app.client.post("/v1/images/generations", headers=bearer("alice"),
                               json={"prompt": "a calm lake", "n": 2, "size": "64x64",
                                     "response_format": response_format})
    refused(response)
    assert "image" in response.json()["error"]["message"]
    assert not app.storage.list("outputs/")
    assert app.sdxl.requests[0].store is False
    assert app.llm.kinds() == ["moderation"] * 3  # the prompt, then each of the two images
    assert [images_of(r) for r in app.llm.requests[1:]] == [[png(seed=50)], [png(seed=51)]]


def test_outputs_that_pass_are_stored_after_the_check(moderated):
    response = moderated.client.post("/v1/images/generations", headers=bearer("alice"),
                                     json={"prompt": "a calm lake", "n": 2, "size": "64x64"})
    assert response.status_code == 200, response.text
    urls = [d["url"] for d in response.json()["data"]]
    stored = moderated.storage.list("outputs/")
    assert len(stored) == 2 and all(any(url.endswith(key) for url in urls) for key in stored)
    for i, url in enumerate(urls):
        file = moderated.client.get(url.removeprefix(LOCAL), headers=bearer("alice"))
        assert file.status_code == 200 and file.content == png(seed=50 + i)
    assert moderated.client.get(urls[0].removeprefix(LOCAL), headers=bearer("bob")).status_code == 404


def test_moderation_off_asks_the_language_model_nothing(app):
    response = app.client.post("/v1/images/generations", headers=bearer("alice"),
                               json={"prompt": f"a {FLAG_WORD} scene", "size": "64x64"})
    assert response.status_code == 200, response.text
    made = app.client.post("/v1/images/generations?async=true", headers=bearer("alice"), json={"prompt": "x"})
    assert "moderation" not in app.services.jobs.jobs.get(made.json()["id"]).request
    assert not app.llm.requests
    assert app.sdxl.requests[0].store is True  # stored by the replica, as before


def test_moderation_without_a_language_model_refuses_to_start(tmp_path):
    with pytest.raises(ValueError, match="moderation"):
        build(tmp_path, moderation={"enabled": True}, llm=False)
