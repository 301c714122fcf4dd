"""training.lora: Ray Train LoRA / DreamBooth runs on the tiny SDXL with CPU workers.

Runs are kept tiny (64x64, a handful of steps); Ray's start and the worker groups dominate.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from configs.local_runner import init_local_ray
from configs.tiny_models import ensure_tiny_models
from storage import Storage
from storage.datasets import DatasetStore, ImageItem
from storage.registry import LoraRegistry
from training.config import TrainConfig, TrainConfigError, load_config
from training.lora import FAIL_AT_ENV, check_inputs, read_status, run_prefix, train

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(900)


def png(seed: int, size: tuple[int, int] = (80, 72)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> Path:
    return ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]


@pytest.fixture(scope="module")
def ray_local():
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")  # see init_local_ray(for_training=True)
    init_local_ray(attempts=8, for_training=True)
    yield
    ray.shutdown()
    patch.undo()


@pytest.fixture()
def dataset(tmp_path):
    """Eight captioned-or-not images in a fresh local storage root; returns (storage, dataset id)."""
    storage = Storage(str(tmp_path / "root"))
    store = DatasetStore(storage)
    dataset_id = store.create("dogs", trigger_word="sks").id
    store.add_images(dataset_id, [ImageItem(f"{i}.png", png(i), caption=f"a dog, photo {i}" if i % 2 else "")
                                  for i in range(8)])
    return storage, dataset_id


def tiny_config(storage: Storage, dataset: str, model_dir: Path, **fields) -> TrainConfig:
    return load_config({
        "name": "dogs", "base_model": str(model_dir), "dataset_id": dataset, "resolution": 64, "max_steps": 6,
        "checkpoint_every_steps": 2, "num_workers": 1, "cpus_per_worker": 0.5, "learning_rate": 1e-3,
        "validation_seeds": [0, 1], "validation_inference_steps": 2, "storage_root": storage.root, **fields})


def adapter_keys(storage: Storage, key: str) -> list[str]:
    from safetensors import safe_open

    with safe_open(storage.full_path(key), "pt") as f:
        return list(f.keys())


def loads_into_a_pipeline(model: Path, storage: Storage, key: str) -> dict:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(storage.full_path(key), adapter_name="trained")
    return pipe.get_list_adapters()


# --- bad input: refused before anything starts ------------------------------------------------------


@pytest.mark.parametrize("fields, param", [
    ({"rank": 0}, "rank"),
    ({"rank": -2}, "rank"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"resolution": 100}, "resolution"),
    ({"max_steps": None}, "max_steps"),
    ({"method": "dreambooth"}, "class_prompt"),
    ({"mixed_precision": "bf16"}, "mixed_precision"),
    ({"name": "../escape"}, "name"),
    ({"unknown_field": 1}, "unknown_field"),
])
def test_config_errors_name_the_field(fields, param, tmp_path):
    base = {"name": "dogs", "base_model": "m", "dataset_id": "d", "max_steps": 2, "storage_root": str(tmp_path)}
    with pytest.raises(TrainConfigError) as raised:
        load_config({**base, **fields})
    assert raised.value.param == param


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("name: dogs\nbase_model: models/tiny/sdxl\ndataset_id: ds_1\nmax_steps: 3\nrank: 8\n"
                    "resolution: 512\nvalidation_seeds: [1, 2]\n")
    config = load_config(path)
    assert (config.rank, config.lora_alpha, config.resolution, config.validation_seeds) == (8, 8.0, 512, [1, 2])
    path.write_text("name: dogs\nbase_model: m\ndataset_id: d\nmax_steps: 3\nresolution: 1001\n")
    with pytest.raises(TrainConfigError) as raised:
        load_config(path)
    assert raised.value.param == "resolution"


def test_storage_checks_refuse_before_training(dataset, model):
    storage, dataset_id = dataset
    cases = [
        ({"dataset_id": "ds_missing"}, "dataset_id"),
        ({"dataset_version": 7}, "dataset_version"),
        ({"base_model": str(model.parent / "no-such-model")}, "base_model"),
        ({"base_model": str(model.parent / "svd")}, "base_model"),  # a model, but not SDXL
        ({"min_images": 9}, "dataset_id"),
        ({"min_size": 100}, "dataset_id"),  # every image is 80x72
        ({"num_workers": 3, "batch_size": 3}, "batch_size"),
    ]
    for fields, param in cases:
        with pytest.raises(TrainConfigError) as raised:
            train(tiny_config(storage, dataset_id, model, **fields))  # no Ray needed: it fails first
        assert raised.value.param == param, fields
    assert storage.list("training/") == [] and storage.list("models/") == []

    plan = check_inputs(tiny_config(storage, "dogs", model))  # by name, too
    assert (plan.dataset_id, plan.num_images, plan.trigger_word, plan.run_name) == (dataset_id, 8, "sks", "dogs")
    assert plan.total_steps == 6 and plan.instance_caption == "a photo of sks"

    # a taken name is refused unless a new version is asked for
    from tests.unit.test_registry import MANIFEST, WEIGHTS

    LoraRegistry(storage).register("dogs", MANIFEST, WEIGHTS)
    with pytest.raises(TrainConfigError) as raised:
        check_inputs(tiny_config(storage, dataset_id, model))
    assert raised.value.param == "name"
    assert check_inputs(tiny_config(storage, dataset_id, model, new_version=True)).run_name == "dogs-v2"


# --- runs ----------------------------------------------------------------------------------------------


def test_two_workers_survive_a_killed_worker_and_register_the_adapter(ray_local, dataset, model, monkeypatch):
    storage, dataset_id = dataset
    # rank 1 exits abruptly once, after step 3; the checkpoint of step 2 is the latest
    monkeypatch.setenv(FAIL_AT_ENV, "1:3")
    config = tiny_config(storage, dataset_id, model, num_workers=2, max_failures=1, validation_every_steps=3)
    result = train(config)

    # 1. It finished, after resuming from a checkpoint rather than from step 0.
    assert storage.exists(f"{run_prefix('dogs')}fault-injected")  # the worker really died
    assert result.metrics["step"] == 6 and result.metrics["workers"] == 2
    assert result.metrics["resumed_from_steps"] == [2]
    status = read_status(storage, "dogs")
    assert (status.state, status.step, status.total_steps, status.lora) == ("succeeded", 6, 6, "dogs:1")
    assert status.resumed_from_step == 2 and status.checkpoint_step == 6

    # 2. Registered, with its manifest.
    record = LoraRegistry(storage).get("dogs")
    assert record.id == result.lora.id == "dogs:1"
    manifest = record.manifest
    assert (manifest.base_model, manifest.method, manifest.trigger_word, manifest.rank) == (str(model), "lora", "sks", 4)
    assert (manifest.dataset_id, manifest.dataset_version) == (dataset_id, 1)
    assert manifest.hyperparameters["learning_rate"] == 1e-3 and manifest.hyperparameters["total_steps"] == 6
    assert manifest.metrics["resumed_from_steps"] == [2] and np.isfinite(manifest.metrics["loss"])
    assert manifest.validation_seeds == [0, 1]
    rendered = {(image["step"], image["seed"]) for image in manifest.validation_images}
    assert rendered == {(3, 0), (3, 1), (6, 0), (6, 1)}
    for image in manifest.validation_images:
        assert Image.open(io.BytesIO(storage.get_bytes(image["key"]))).size == (64, 64)

    # 3. The adapter is a diffusers LoRA of the UNet that a pipeline loads.
    keys = adapter_keys(storage, record.weights_key)
    assert keys and all(k.startswith("unet.") and ".lora." in k for k in keys)
    # down and up matrices of q/k/v/out in 24 attention layers (12 transformer blocks, self and cross)
    assert len(keys) == 2 * 4 * 24
    assert loads_into_a_pipeline(model, storage, record.weights_key)["unet"] == ["trained"]


def test_dreambooth_failed_run_registers_nothing_and_a_rerun_resumes(ray_local, dataset, model, monkeypatch):
    storage, dataset_id = dataset
    config = tiny_config(storage, dataset_id, model, name="dogs-db", method="dreambooth",
                         instance_prompt="a photo of {trigger_word} dog", class_prompt="a photo of a dog",
                         num_class_images=2, class_inference_steps=2, prior_loss_weight=0.5, max_steps=4,
                         train_text_encoder=True, gradient_checkpointing=True, cache_latents=True,
                         max_failures=0, validation_seeds=[3])

    # 1. Rank 0 dies after step 3 and no restart is allowed: the run fails and registers nothing.
    monkeypatch.setenv(FAIL_AT_ENV, "0:3")
    with pytest.raises(Exception):
        train(config)
    registry = LoraRegistry(storage)
    assert not registry.exists("dogs-db") and storage.list("models/") == []
    status = read_status(storage, "dogs-db")
    assert status.state == "failed" and status.error  # it died after step 3, before reporting it
    assert (status.step, status.checkpoint_step) == (2, 2)
    class_images = [k for k in storage.list("training/class_images/") if k.endswith(".png")]
    assert len(class_images) == 2  # generated by the Ray Data batch-inference step, cached in storage
    cached = {k: storage.get_bytes(k) for k in class_images}

    # 2. Running the same name again resumes from the step-2 checkpoint (the fault fires once).
    result = train(config)
    assert result.metrics["resumed_from_steps"] == [2] and result.metrics["step"] == 4
    assert {k: storage.get_bytes(k) for k in class_images} == cached  # reused, not generated again
    record = registry.get("dogs-db")
    assert record.id == result.lora.id == "dogs-db:1"
    manifest = record.manifest
    assert (manifest.method, manifest.trigger_word, manifest.train_text_encoder) == ("dreambooth", "sks", True)
    assert manifest.validation_prompt == "a photo of sks dog"
    assert manifest.hyperparameters["class_prompt"] == "a photo of a dog"
    assert manifest.hyperparameters["prior_loss_weight"] == 0.5
    assert [(i["step"], i["seed"]) for i in manifest.validation_images] == [(4, 3)]
    prefixes = {k.split(".", 1)[0] for k in adapter_keys(storage, record.weights_key)}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    adapters = loads_into_a_pipeline(model, storage, record.weights_key)
    assert adapters == {"unet": ["trained"], "text_encoder": ["trained"], "text_encoder_2": ["trained"]}
    status = json.loads(storage.get_bytes("training/dogs-db/status.json"))
    assert (status["state"], status["step"], status["lora"]) == ("succeeded", 4, "dogs-db:1")


def test_example_configs_load_with_their_environment(monkeypatch):
    monkeypatch.setenv("ATELIER_DATASET", "ds_abc")
    monkeypatch.setenv("ATELIER_STORAGE_ROOT", "s3://bucket/atelier")
    production = load_config(REPO / "configs" / "training" / "sdxl-lora.yaml")
    assert (production.dataset_id, production.storage_root) == ("ds_abc", "s3://bucket/atelier")
    assert production.use_gpu and production.mixed_precision == "bf16" and production.resolution == 1024
    tiny = load_config(REPO / "configs" / "training" / "tiny-lora.yaml", storage_root="/tmp/x")
    assert tiny.num_workers == 2 and tiny.resolution == 64 and tiny.storage_root == "/tmp/x"
