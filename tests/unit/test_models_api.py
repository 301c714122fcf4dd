"""Issue 22, item 1 (models): every deployed model with its limits, one model or LoRA by id, and
deleting a LoRA version (its owner only; other versions stay; new requests no longer find it)."""

from __future__ import annotations

import pytest

from storage.registry import LoraManifest
from tests.keyed_app import keyed_app, png, safetensors_bytes

KEYS = {"ann": ("ann-key", ["generate", "train"]), "ben": ("ben-key", ["generate", "train"]),
        "viewer": ("view-key", ["read"])}
WEIGHTS = safetensors_bytes(["unet.down_blocks.0.attn1.to_q.lora.down.weight"])


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture()
def app(tmp_path):
    built = keyed_app(tmp_path, KEYS)
    registry = built.services.models.loras
    for _ in range(2):
        registry.register("ink", LoraManifest(base_model="m", rank=2, trigger_word="inky"), WEIGHTS,
                          new_version=True, owner="ann")
    return built


def test_every_deployed_model_is_listed_with_its_limits(app):
    cards = {card["kind"]: card for card in app.client.get("/v1/models", headers=bearer("ann")).json()["data"]}
    assert set(cards) >= {"image", "video", "upscaler", "lora"}
    video = cards["video"]["metadata"]
    assert video["max_num_frames"] == 4 and video["max_steps"] == 50 and video["min_size"] == 32
    assert cards["upscaler"]["metadata"]["scale"] == 4 and cards["upscaler"]["metadata"]["max_input_size"] == 256
    assert cards["image"]["metadata"]["max_size"] == 256
    assert cards["lora"]["id"] == "ink:2"  # the latest version, by default


def test_one_model_or_lora_by_id(app):
    client = app.client
    base = client.get("/v1/models", headers=bearer("ann")).json()["data"][0]
    assert client.get(f"/v1/models/{base['id']}", headers=bearer("ann")).json()["kind"] == "image"
    lora = client.get("/v1/models/ink:1", headers=bearer("ann")).json()
    assert lora["metadata"]["version"] == 1 and lora["metadata"]["trigger_word"] == "inky"
    assert client.get("/v1/models/ink", headers=bearer("ann")).json()["id"] == "ink:2"
    assert client.get("/v1/models/ink:1", headers=bearer("ben")).status_code == 404  # ann's, private
    missing = client.get("/v1/models/nope", headers=bearer("ann"))
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_deleting_a_lora_version_leaves_the_others_and_is_its_owners(app):
    client = app.client
    assert client.delete("/v1/models/ink:1", headers=bearer("ben")).status_code == 404
    assert client.delete("/v1/models/ink:1", headers=bearer("viewer")).status_code == 403  # read scope
    no_version = client.delete("/v1/models/ink", headers=bearer("ann"))
    assert no_version.status_code == 400 and no_version.json()["error"]["param"] == "model"
    base = client.get("/v1/models", headers=bearer("ann")).json()["data"][0]["id"]
    assert client.delete(f"/v1/models/{base}", headers=bearer("ann")).status_code == 400
    deleted = client.delete("/v1/models/ink:1", headers=bearer("ann"))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert client.get("/v1/models/ink:1", headers=bearer("ann")).status_code == 404
    assert client.get("/v1/models/ink:2", headers=bearer("ann")).status_code == 200
    # a new request naming the deleted version is refused (404, as OpenAI answers an unknown model);
    # the other version still works
    gone = client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                       json={"prompt": "x", "steps": 2, "lora": "ink:1"})
    assert gone.status_code == 404, gone.text
    assert gone.json()["error"] | {"message": ""} == {"type": "model_not_found", "code": "model_not_found",
                                                      "param": "lora", "message": ""}
    assert client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                       json={"prompt": "x", "steps": 2, "lora": "ink:2"}).status_code == 202


def test_every_route_that_takes_a_lora_answers_404_for_one_not_registered(app):
    client = app.client
    app.services.models.loras.delete("ink", 1)
    image = {"image": ("in.png", png(), "image/png")}
    for lora in ("ink:1", "ink:7", "nope", "nope:2"):  # deleted, never made, no such name
        answers = {
            "generations": client.post("/v1/images/generations", headers=bearer("ann"),
                                       json={"prompt": "x", "steps": 2, "lora": lora}),
            "generations async": client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                                             json={"prompt": "x", "steps": 2, "lora": lora}),
            "edits": client.post("/v1/images/edits?async=true", headers=bearer("ann"), files=image,
                                 data={"prompt": "x", "lora": lora}),
        }
        for route, answer in answers.items():
            error = answer.json()["error"]
            assert (answer.status_code, error["code"], error["param"]) == (404, "model_not_found", "lora"), \
                (route, lora, answer.text)
    assert client.post("/v1/images/generations?async=true", headers=bearer("ben"),  # ann's, private: the same
                       json={"prompt": "x", "lora": "ink:2"}).status_code == 404
    malformed = client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                            json={"prompt": "x", "lora": "a/b"})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "lora"  # not a reference at all
    assert app.queue.sent == []


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class FakeSDXL:
    """The SDXL deployment's import_lora, as a converted adapter (the conversion itself: test_lora_import.py)."""

    def __init__(self):
        from deployments.sdxl.lora import ImportedLora
        self.received: list[bytes] = []
        self.import_lora = _Remote(lambda data: self.received.append(data) or ImportedLora(
            weights=WEIGHTS, source_format="kohya", rank=4, alpha=2.0, layers=1, target_modules=["to_q"],
            train_text_encoder=False))


def test_importing_a_lora_registers_it_with_its_source(app):
    client, fake = app.client, FakeSDXL()
    app.services.models.handles["sdxl"] = fake
    raw = safetensors_bytes(["lora_unet_down_blocks_0_attentions_0.lora_down.weight"])
    upload = {"file": ("ink-kohya.safetensors", raw, "application/octet-stream")}
    made = client.post("/v1/models", headers=bearer("ben"), files=upload,
                       data={"name": "pencil", "trigger_word": "pnc", "description": "from a file"})
    assert made.status_code == 201, made.text
    card = made.json()
    assert card["id"] == "pencil:1" and card["kind"] == "lora" and fake.received == [raw]
    meta = card["metadata"]
    assert meta["trigger_word"] == "pnc" and meta["rank"] == 4 and meta["alpha"] == 2.0
    assert meta["source"]["format"] == "kohya" and meta["source"]["filename"] == "ink-kohya.safetensors"
    assert meta["source"]["size_bytes"] == len(raw) and len(meta["source"]["sha256"]) == 64
    assert client.get("/v1/models/pencil", headers=bearer("ben")).json()["id"] == "pencil:1"
    assert client.get("/v1/models/pencil", headers=bearer("ann")).status_code == 404  # ben's, private
    again = client.post("/v1/models", headers=bearer("ben"), files=upload, data={"name": "pencil"})
    assert again.status_code == 201 and again.json()["id"] == "pencil:2"  # the owner's name: a new version
    taken = client.post("/v1/models", headers=bearer("ann"), files=upload, data={"name": "pencil"})
    assert taken.status_code == 409 and taken.json()["error"]["param"] == "name"
    assert client.post("/v1/models", headers=bearer("viewer"), files=upload,
                       data={"name": "x"}).status_code == 403  # read scope


def test_bad_imports_name_the_field(app):
    client = app.client
    app.services.models.handles["sdxl"] = FakeSDXL()
    upload = {"file": ("a.safetensors", b"raw", "application/octet-stream")}
    no_file = client.post("/v1/models", headers=bearer("ann"), data={"name": "x"})
    assert no_file.status_code == 400 and no_file.json()["error"]["param"] == "file"
    no_name = client.post("/v1/models", headers=bearer("ann"), files=upload)
    assert no_name.status_code == 400 and no_name.json()["error"]["param"] == "name"
    bad_name = client.post("/v1/models", headers=bearer("ann"), files=upload, data={"name": "../etc"})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"


def lora_file(layers: int) -> bytes:
    return safetensors_bytes([f"lora_unet_down_blocks_0_attentions_{i}.lora_down.weight" for i in range(layers)])


def test_an_import_past_its_bound_is_a_413_naming_the_file(app):
    client, fake = app.client, FakeSDXL()
    app.services.models.handles["sdxl"] = fake
    at_limit = lora_file(1)
    app.services.models.max_import_bytes = len(at_limit)  # as ingress.max_lora_import_bytes sets it
    fits = client.post("/v1/models", headers=bearer("ann"), data={"name": "small"},
                       files={"file": ("a.safetensors", at_limit, "application/octet-stream")})
    assert fits.status_code == 201, fits.text
    over = client.post("/v1/models", headers=bearer("ann"), data={"name": "big"},
                       files={"file": ("b.safetensors", lora_file(2), "application/octet-stream")})
    assert over.status_code == 413 and over.json()["error"]["param"] == "file", over.text
    assert str(len(at_limit)) in over.json()["error"]["message"]
    assert fake.received == [at_limit]


def test_the_import_bound_is_its_own_not_the_image_upload_limit(tmp_path):
    """max_upload_bytes bounds images; a LoRA file (commonly 100-400 MB) has max_lora_import_bytes."""
    from api.config import IngressConfig
    from api.errors import MULTIPART_OVERHEAD_BYTES

    assert IngressConfig.model_fields["max_lora_import_bytes"].default == 512 * 1024**2
    app = keyed_app(tmp_path, KEYS, ingress={"max_upload_bytes": 1024})
    app.client.app.state.max_body_bytes = 1024  # the body-size middleware's limit, as the ingress sets it
    app.services.models.handles["sdxl"] = FakeSDXL()
    data = lora_file(1500)
    assert len(data) > 1024 + MULTIPART_OVERHEAD_BYTES  # past what the body limit lets through for an image
    made = app.client.post("/v1/models", headers=bearer("ann"), data={"name": "larger"},
                           files={"file": ("l.safetensors", data, "application/octet-stream")})
    assert made.status_code == 201, made.text
    image = app.client.post("/v1/images/edits", headers=bearer("ann"), data={"prompt": "x"},
                            files={"image": ("in.png", png(), "image/png")})
    assert image.status_code == 413 and image.json()["error"]["param"] == "image"


@pytest.mark.parametrize("data", [b"not a safetensors file" * 3, b"", safetensors_bytes(["some.weight"])],
                         ids=["not_safetensors", "empty", "no_lora_tensors"])
def test_a_file_that_is_no_lora_is_refused_before_it_reaches_the_model(app, data):
    fake = FakeSDXL()
    app.services.models.handles["sdxl"] = fake
    refused = app.client.post("/v1/models", headers=bearer("ann"), data={"name": "junk"},
                              files={"file": ("junk.safetensors", data, "application/octet-stream")})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "file", refused.text
    assert fake.received == []
