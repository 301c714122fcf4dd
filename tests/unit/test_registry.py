"""storage.registry: registering, versioning and reading LoRA adapters, on local storage and S3."""

from __future__ import annotations

import hashlib
import json
import struct
import threading

import pytest

from storage.registry import (
    WEIGHTS_NAME,
    InvalidLoraError,
    LoraExistsError,
    LoraNotFoundError,
    LoraRegistry,
    parse_lora_ref,
)


def safetensors_bytes(names: list[str], fill: int = 0) -> bytes:
    """A valid safetensors file of 2-element float32 tensors."""
    header, offset = {}, 0
    for name in names:
        header[name] = {"dtype": "F32", "shape": [2], "data_offsets": [offset, offset + 8]}
        offset += 8
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + bytes([fill]) * offset


WEIGHTS = safetensors_bytes(["unet.down_blocks.0.attn1.to_q.lora.down.weight",
                             "unet.down_blocks.0.attn1.to_q.lora.up.weight"])
MANIFEST = {"base_model": "models/tiny/sdxl", "method": "lora", "trigger_word": "sks", "rank": 4,
            "dataset_id": "ds_1", "dataset_version": 2, "hyperparameters": {"learning_rate": 1e-4},
            "metrics": {"loss": 0.1}, "validation_seeds": [0, 1], "training_run": "run-a"}


def test_register_get_and_read_back(storage):
    registry = LoraRegistry(storage)
    assert not registry.exists("corgi") and registry.list() == []
    record = registry.register("corgi", MANIFEST, WEIGHTS)
    assert (record.name, record.version, record.id) == ("corgi", 1, "corgi:1")
    assert record.weights_key == registry.weights_key("corgi", 1) == f"models/loras/corgi/1/{WEIGHTS_NAME}"
    assert registry.exists("corgi")
    got = registry.get("corgi")
    assert got == record
    assert got.manifest.base_model == "models/tiny/sdxl" and got.trigger_word == "sks"
    assert got.manifest.dataset_version == 2 and got.manifest.validation_seeds == [0, 1]
    assert registry.get_weights("corgi", 1) == WEIGHTS == storage.get_bytes(record.weights_key)
    assert registry.resolve("corgi:1") == record and registry.resolve("corgi:latest") == record


def test_weights_sha256_is_recorded_for_lineage(storage):
    registry = LoraRegistry(storage)
    first = registry.register("corgi", MANIFEST, WEIGHTS)
    other_weights = safetensors_bytes(["unet.lora.down.weight"], fill=1)
    second = registry.register("corgi", MANIFEST, other_weights, new_version=True)
    assert first.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert second.sha256 == hashlib.sha256(other_weights).hexdigest() != first.sha256
    # it is in the stored manifest, so every reader (SDXL replicas, the ingress) sees it
    assert storage.get_json(registry.manifest_key("corgi", 1))["sha256"] == first.sha256
    assert registry.get("corgi", 1).sha256 == first.sha256
    # a version registered before the hash was recorded still reads, without one
    legacy = {k: v for k, v in storage.get_json(registry.manifest_key("corgi", 2)).items() if k != "sha256"}
    storage.put_json(registry.manifest_key("corgi", 2), legacy)
    assert registry.get("corgi", 2).sha256 is None


def test_name_collision_needs_new_version(storage):
    registry = LoraRegistry(storage)
    registry.register("corgi", MANIFEST, WEIGHTS)
    with pytest.raises(LoraExistsError) as raised:
        registry.register("corgi", MANIFEST, WEIGHTS)
    assert raised.value.param == "name"
    second = registry.register("corgi", {**MANIFEST, "rank": 8}, WEIGHTS, new_version=True)
    assert second.version == 2
    assert registry.versions("corgi") == [1, 2]
    assert registry.get("corgi").version == 2 and registry.get("corgi").manifest.rank == 8
    assert registry.get("corgi", 1).manifest.rank == 4
    assert [r.id for r in registry.list()] == ["corgi:1", "corgi:2"]
    assert [r.id for r in registry.list(latest_only=True)] == ["corgi:2"]


def test_list_and_lookups(storage, tmp_path):
    registry = LoraRegistry(storage)
    folder = tmp_path / "adapter"  # as save_lora_weights writes it
    folder.mkdir()
    (folder / WEIGHTS_NAME).write_bytes(WEIGHTS)
    registry.register("b-style", MANIFEST, folder)
    registry.register("a.style", MANIFEST, str(folder / WEIGHTS_NAME))
    assert registry.names() == ["a.style", "b-style"]
    assert [r.id for r in registry.list()] == ["a.style:1", "b-style:1"]
    assert registry.find_by_run("a.style", "run-a").id == "a.style:1"
    assert registry.find_by_run("a.style", "other") is None
    with pytest.raises(LoraNotFoundError) as raised:
        registry.get("nope")
    assert raised.value.param == "name"
    with pytest.raises(LoraNotFoundError) as raised:
        registry.get("a.style", 5)
    assert raised.value.param == "version"
    with pytest.raises(LoraNotFoundError) as raised:
        registry.resolve("nope:2")
    assert raised.value.param == "lora"


def test_bad_input_registers_nothing(storage):
    registry = LoraRegistry(storage)
    for name in ("", "a/b", "../x", ".hidden", "a:b"):
        with pytest.raises(InvalidLoraError) as raised:
            registry.register(name, MANIFEST, WEIGHTS)
        assert raised.value.param == "name"
    with pytest.raises(InvalidLoraError) as raised:
        registry.register("x", {**MANIFEST, "rank": 0}, WEIGHTS)
    assert raised.value.param == "manifest"
    for weights in (b"", b"not a safetensors file", safetensors_bytes(["unet.conv.weight"])):
        with pytest.raises(InvalidLoraError) as raised:
            registry.register("x", MANIFEST, weights)
        assert raised.value.param == "weights"
    assert registry.list() == [] and storage.list("models/") == []


def test_failed_write_leaves_nothing_registered(storage, monkeypatch):
    registry = LoraRegistry(storage)
    real_put_json = type(storage).put_json

    def failing_put_json(self, key, obj):
        if key.endswith("manifest.json"):
            raise OSError("disk full")
        return real_put_json(self, key, obj)

    monkeypatch.setattr(type(storage), "put_json", failing_put_json)
    with pytest.raises(OSError):
        registry.register("corgi", MANIFEST, WEIGHTS)
    monkeypatch.undo()
    assert not registry.exists("corgi") and storage.list("models/loras/") == []
    assert registry.register("corgi", MANIFEST, WEIGHTS).version == 1  # the name is still free


def test_concurrent_new_versions_get_distinct_numbers(storage):
    registry = LoraRegistry(storage)
    registry.register("corgi", MANIFEST, WEIGHTS)
    versions, errors = [], []

    def add():
        try:
            versions.append(registry.register("corgi", MANIFEST, WEIGHTS, new_version=True).version)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(versions) == [2, 3, 4, 5] and registry.versions("corgi") == [1, 2, 3, 4, 5]


def test_concurrent_first_registrations_of_one_name_admit_one(storage):
    registry = LoraRegistry(storage)
    # several rounds on local disk, where a version folder shows up before its claim does
    for round_ in range(8 if storage.protocol == "file" else 2):
        name = f"corgi-{round_}"
        outcomes = []

        def add():
            try:
                outcomes.append(registry.register(name, MANIFEST, WEIGHTS).version)
            except LoraExistsError:
                outcomes.append("exists")

        threads = [threading.Thread(target=add) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes, key=str) == [1] + ["exists"] * 5, name
        assert registry.versions(name) == [1]


def test_delete_never_reuses_a_version_number(storage):
    registry = LoraRegistry(storage)
    registry.register("corgi", MANIFEST, WEIGHTS)
    registry.register("corgi", MANIFEST, WEIGHTS, new_version=True)
    registry.delete("corgi", 2)
    assert registry.versions("corgi") == [1]
    assert not storage.exists(registry.weights_key("corgi", 2))
    assert registry.register("corgi", MANIFEST, WEIGHTS, new_version=True).version == 3
    registry.delete("corgi")
    assert not registry.exists("corgi")
    with pytest.raises(LoraNotFoundError):
        registry.delete("corgi")


def test_parse_lora_ref():
    assert parse_lora_ref("corgi") == ("corgi", None)
    assert parse_lora_ref("corgi:3") == ("corgi", 3)
    assert parse_lora_ref("corgi:latest") == ("corgi", None)
    for bad in ("", "corgi:0", "corgi:x", "a/b:1", ":1"):
        with pytest.raises(InvalidLoraError) as raised:
            parse_lora_ref(bad)
        assert raised.value.param == "lora"
