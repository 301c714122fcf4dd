"""Issue 22, item 1 (models): every deployed model with its limits, one model or LoRA by id, and
deleting a LoRA version (its owner only; other versions stay; new requests no longer find it)."""

from __future__ import annotations

import pytest

from storage.registry import LoraManifest
from tests.keyed_app import keyed_app, safetensors_bytes

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
    # a new request naming the deleted version is refused; the other version still works
    gone = client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                       json={"prompt": "x", "steps": 2, "lora": "ink:1"})
    assert gone.status_code == 400 and gone.json()["error"]["param"] == "lora"
    assert client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                       json={"prompt": "x", "steps": 2, "lora": "ink:2"}).status_code == 202


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
    upload = {"file": ("ink-kohya.safetensors", b"raw-bytes", "application/octet-stream")}
    made = client.post("/v1/models", headers=bearer("ben"), files=upload,
                       data={"name": "pencil", "trigger_word": "pnc", "description": "from a file"})
    assert made.status_code == 201, made.text
    card = made.json()
    assert card["id"] == "pencil:1" and card["kind"] == "lora" and fake.received == [b"raw-bytes"]
    meta = card["metadata"]
    assert meta["trigger_word"] == "pnc" and meta["rank"] == 4 and meta["alpha"] == 2.0
    assert meta["source"]["format"] == "kohya" and meta["source"]["filename"] == "ink-kohya.safetensors"
    assert meta["source"]["size_bytes"] == len(b"raw-bytes") and len(meta["source"]["sha256"]) == 64
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
