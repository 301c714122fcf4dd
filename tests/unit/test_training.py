"""training (plan, loop, class images): Ray Train LoRA / DreamBooth runs on the tiny SDXL with CPU workers.

Runs are kept tiny (64x64, a handful of steps); Ray's start and the worker groups dominate.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
from PIL import Image

from local.runner import init_local_ray
from local.tiny_models import ensure_tiny_models
from storage import Storage
from storage.datasets import DatasetStore, ImageItem
from storage.registry import LoraRegistry
from training.config import TrainConfig, TrainConfigError, load_config
from training.loop import FAIL_AT_ENV, train
from training.plan import check_inputs, read_status, resume_record

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
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": 2.0}, "learning_rate"),  # over MAX_LEARNING_RATE: a typo for 2e-4
    ({"alpha": float("inf")}, "alpha"),
    ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ({"rank": 100_000}, "rank"),
    ({"resolution": 8192}, "resolution"),
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


def test_resuming_a_run_trained_differently_names_the_field(dataset, model, tmp_path):
    storage, dataset_id = dataset
    config = tiny_config(storage, dataset_id, model)
    plan = check_inputs(config)
    # what the worker writes in each checkpoint's state.json (see _train_loop)
    storage.put_json("training/dogs/checkpoint_00000002/state.json",
                     {"step": 2, "resumed_from_steps": [], "config": resume_record(config, plan)})
    assert check_inputs(tiny_config(storage, dataset_id, model, max_steps=12)).run_name == "dogs"  # longer is fine

    other = DatasetStore(storage).create("cats").id
    DatasetStore(storage).add_images(other, [ImageItem(f"{i}.png", png(50 + i)) for i in range(8)])
    for fields, param in [({"rank": 8}, "rank"), ({"dataset_id": other}, "dataset_id"),
                          ({"learning_rate": 5e-4}, "learning_rate"), ({"train_text_encoder": True}, "train_text_encoder"),
                          ({"resolution": 128}, "resolution")]:
        with pytest.raises(TrainConfigError) as raised:
            check_inputs(tiny_config(storage, dataset_id, model, **fields))
        assert raised.value.param == param, fields
        assert "step 2" in raised.value.message and "resume" in raised.value.message
    # a new dataset version is a different run too
    DatasetStore(storage).add_images(dataset_id, [ImageItem("extra.png", png(99))])
    with pytest.raises(TrainConfigError) as raised:
        check_inputs(config)
    assert raised.value.param == "dataset_version"
    assert check_inputs(tiny_config(storage, dataset_id, model, dataset_version=1)).run_name == "dogs"


# --- POST /v1/fine_tuning/jobs: FineTuningService with an injected Ray job client ---------------------


class FakeJobClient:
    """Ray's JobSubmissionClient, as far as the fine-tuning routes use it."""

    def __init__(self, submit_error: Exception | None = None, info_error: Exception | None = None):
        self.status: dict[str, str] = {}
        self.submit_error, self.info_error = submit_error, info_error

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict) -> str:
        assert entrypoint.endswith("'") and "python -m training.cli --config-json" in entrypoint
        if self.submit_error is not None:
            raise self.submit_error
        self.status[submission_id] = "PENDING"
        return submission_id

    def get_job_info(self, job_id: str):
        if self.info_error is not None:
            raise self.info_error
        if job_id not in self.status:
            raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")
        return SimpleNamespace(status=self.status[job_id], message="", end_time=None)


@pytest.fixture()
def api(dataset, model):
    """``(TestClient, FakeJobClient, storage, dataset id, configure)`` over the fine-tuning routes and the real
    FineTuningService with an injected Ray job client (``configure(**FineTuningConfig)`` rebuilds it)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.errors import add_error_handlers
    from api.fine_tuning.router import router
    from api.fine_tuning.service import FineTuningConfig, FineTuningService
    from deployments.sdxl.contract import SDXLLimits
    from storage.fine_tuning import FineTuningStore

    storage, dataset_id = dataset
    jobs = FakeJobClient()
    base = SDXLLimits.from_config({"model": str(model)}, styles={})
    defaults = {"resolution": 64, "max_steps": 8, "num_workers": 1, "cpus_per_worker": 0.5, "learning_rate": 1e-3}
    app = FastAPI()
    add_error_handlers(app)
    app.include_router(router)

    def configure(**settings):
        config = FineTuningConfig(**{"defaults": defaults, **settings})
        app.state.fine_tuning = FineTuningService(FineTuningStore(storage), storage, config, base, storage.root, {},
                                                  job_client=lambda: jobs, nodes=lambda: None)

    configure()
    yield TestClient(app, raise_server_exceptions=False), jobs, storage, dataset_id, configure


def post_job(client, dataset_id: str, **fields):
    # json.dumps writes inf and nan as JSON's Infinity and NaN, which a client may send
    body = json.dumps({"model": "sdxl", "training_file": dataset_id, **fields})
    return client.post("/v1/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})


def error_of(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def test_a_suffix_in_flight_is_refused_and_new_version_trains_alongside(api):
    client, jobs, storage, dataset_id, _ = api
    first = post_job(client, dataset_id, suffix="dogs")
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["run_name"]) == ("queued", "dogs")

    # 1. The same suffix while the first is queued: 409 naming suffix; nothing submitted.
    error = error_of(post_job(client, dataset_id, suffix="dogs"), 409, "suffix")
    assert first.json()["id"] in error["message"] and error["type"] == "conflict_error"
    assert len(jobs.status) == 1

    # 2. new_version picks a run name no job holds, and a third one the next.
    second = post_job(client, dataset_id, suffix="dogs", new_version=True)
    third = post_job(client, dataset_id, suffix="dogs", new_version=True)
    assert [r.json()["run_name"] for r in (second, third)] == ["dogs-v2", "dogs-v3"]
    jobs.status[first.json()["id"]] = "RUNNING"
    error_of(post_job(client, dataset_id, suffix="dogs"), 409, "suffix")

    # 3. Once the first has failed, its name is free again (a re-run resumes it).
    jobs.status[first.json()["id"]] = "FAILED"
    again = post_job(client, dataset_id, suffix="dogs")
    assert again.status_code == 200 and again.json()["run_name"] == "dogs", again.text
    assert [k.rsplit("/", 1)[1] for k in storage.list("fine_tuning/runs/dogs/")] == ["00000001.json",
                                                                                      "00000002.json"]


def test_concurrent_claims_of_one_run_name_give_it_to_one_job(api, model):
    from deployments.errors import ConflictError

    client, jobs, storage, dataset_id, _ = api
    config = tiny_config(storage, dataset_id, model)
    plan = check_inputs(config)
    barrier = threading.Barrier(8)
    outcomes = []

    def claim(index: int) -> None:
        barrier.wait()
        try:
            outcomes.append(client.app.state.fine_tuning.claim_run(config, plan, f"ftjob-{index}").run_name)
        except ConflictError as exc:
            outcomes.append(exc.param)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["dogs"] + ["suffix"] * 7
    assert storage.list("fine_tuning/runs/dogs/") == ["fine_tuning/runs/dogs/00000001.json"]


def test_a_failed_submission_fails_the_job_and_answers_503(api):
    client, jobs, storage, dataset_id, _ = api
    jobs.submit_error = ConnectionError("the dashboard at http://127.0.0.1:8265 refused the connection")
    response = post_job(client, dataset_id, suffix="dogs")
    assert response.status_code == 503 and response.headers["retry-after"] == "10", response.text
    error = response.json()["error"]
    assert error["type"] == "overloaded_error" and "refused the connection" in error["message"]

    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert len(listed) == 1 and listed[0]["status"] == "failed"
    assert listed[0]["error"]["code"] == "submission_failed" and "refused" in listed[0]["error"]["message"]
    assert listed[0]["id"] in error["message"]

    jobs.submit_error = None  # the name is not held by the job that never started
    retried = post_job(client, dataset_id, suffix="dogs")
    assert retried.status_code == 200 and retried.json()["run_name"] == "dogs", retried.text


def test_a_job_ray_does_not_know_is_not_running_forever(api):
    from storage.fine_tuning import RECORDS_PREFIX
    from training.plan import RunStatus, status_key

    client, jobs, storage, dataset_id, _ = api
    job = post_job(client, dataset_id, suffix="dogs").json()
    key = f"{RECORDS_PREFIX}{job['id']}.json"
    record = storage.get_json(key)
    view = lambda: client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()  # noqa: E731

    jobs.status.clear()  # the cluster restarted: Ray has no such job
    assert view()["status"] == "queued"  # young: its submission may still be under way
    storage.put_json(key, {**record, "created_at": time.time() - 3600})
    stale = view()
    assert stale["status"] == "failed" and "gone" in stale["error"]["message"]

    # Ray cannot be asked at all: a run that reports progress is running; a silent one failed.
    jobs.info_error = ConnectionError("no dashboard")
    status = RunStatus(name="dogs", run_name="dogs", state="training", step=3, total_steps=8, loss=float("nan"),
                       updated_at=time.time())
    storage.put_json(status_key("dogs"), status.model_dump(mode="json"))
    running = view()
    assert (running["status"], running["step"], running["loss"]) == ("running", 3, None)  # NaN loss: null
    storage.put_json(status_key("dogs"), {**status.model_dump(mode="json"), "updated_at": time.time() - 3600})
    assert view()["status"] == "failed"


def test_min_images_is_a_floor_and_hyperparameters_are_bounded(api):
    client, jobs, storage, dataset_id, configure = api
    configure(defaults={"resolution": 64, "max_steps": 8, "num_workers": 1, "cpus_per_worker": 0.5,
                        "min_images": 5}, limits={"max_steps": 100, "rank": 64})

    # 1. min_images: more than the configured 5 may be asked for, fewer may not.
    error = error_of(post_job(client, dataset_id, suffix="a", hyperparameters={"min_images": 2}), 400,
                     "hyperparameters.min_images")
    assert "at least 5" in error["message"]
    error = error_of(post_job(client, dataset_id, suffix="a", hyperparameters={"min_images": 9}), 400,
                     "training_file")
    assert "fewer than min_images 9" in error["message"]

    # 2. Non-finite numbers (JSON's Infinity / NaN) and values over the limits name the field.
    for hyper, param in [({"learning_rate": float("inf")}, "learning_rate"), ({"alpha": float("nan")}, "alpha"),
                         ({"prior_loss_weight": float("inf")}, "prior_loss_weight"), ({"rank": 128}, "rank"),
                         ({"max_steps": 101}, "max_steps"), ({"n_epochs": 1000}, "n_epochs"),
                         ({"resolution": 4096}, "resolution")]:
        error_of(post_job(client, dataset_id, suffix="a", hyperparameters=hyper), 400, f"hyperparameters.{param}")

    # 3. num_workers: what the cluster's nodes hold (two 1-CPU nodes: four 0.5-CPU workers), or a configured max.
    client.app.state.fine_tuning.nodes = lambda: [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]
    error = error_of(post_job(client, dataset_id, suffix="a", hyperparameters={"num_workers": 5}), 400,
                     "hyperparameters.num_workers")
    assert "at most 4 workers" in error["message"]
    assert post_job(client, dataset_id, suffix="a", hyperparameters={"num_workers": 4}).status_code == 200
    configure(defaults={"resolution": 64, "max_steps": 8, "num_workers": 1, "cpus_per_worker": 0.5},
              limits={"num_workers": 2})
    error_of(post_job(client, dataset_id, suffix="b", hyperparameters={"num_workers": 3}), 400,
             "hyperparameters.num_workers")
    assert len(storage.list("fine_tuning/jobs/")) == len(jobs.status) == 1  # only the good request got a job


# --- runs ----------------------------------------------------------------------------------------------


def kill_a_train_worker_after_a_checkpoint(storage: Storage, run_name: str, killed: dict,
                                           timeout_s: float = 600) -> None:
    """From outside the run: once a checkpoint of step >= 2 is committed, SIGKILL the process of
    one Ray Train worker of this cluster on this node. Fills ``killed`` with the pid and that step.

    Committed means recorded in the run's status.json, which rank 0 writes once `ray.train.report`
    has returned (the upload finished): a checkpoint folder seen in storage while its files are
    still uploading is not one a run can promise to resume from (the CI run of 2026-12-04 killed a
    worker between the two, and the run rightly started again from step 0)."""
    import ray._private.state  # the GCS actor table: ray.util.state needs the dashboard init_local_ray leaves out

    node_id = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not killed:
        status = read_status(storage, run_name)
        step = (status.checkpoint_step or 0) if status is not None else 0
        workers = [actor for actor in ray._private.state.actors(actor_state_name="ALIVE").values()
                   if actor["ActorClassName"] == "RayTrainWorker" and actor["Address"]["NodeID"] == node_id
                   and actor["Pid"]]
        if step >= 2 and workers:
            killed.update(pid=workers[-1]["Pid"], checkpoint_step=step)
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.1)


def test_two_workers_survive_a_killed_worker_and_register_the_adapter(ray_local, dataset, model):
    storage, dataset_id = dataset
    config = tiny_config(storage, dataset_id, model, num_workers=2, max_failures=1, max_steps=12,
                         validation_every_steps=6)
    killed: dict = {}
    killer = threading.Thread(target=kill_a_train_worker_after_a_checkpoint, args=(storage, "dogs", killed),
                              daemon=True)
    killer.start()
    result = train(config)
    killer.join(timeout=5)

    # 1. A worker was killed mid-run, and the run finished after resuming from a checkpoint, not step 0.
    assert killed, "no Ray Train worker was killed"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # the worker process really is gone
    assert result.metrics["step"] == 12 and result.metrics["workers"] == 2
    resumed = result.metrics["resumed_from_steps"]
    assert len(resumed) == 1 and resumed[0] >= killed["checkpoint_step"] >= 2, (resumed, killed)
    status = read_status(storage, "dogs")
    assert (status.state, status.step, status.total_steps, status.lora) == ("succeeded", 12, 12, "dogs:1")
    assert status.resumed_from_step == resumed[0] and status.checkpoint_step == 12

    # 2. Registered, with its manifest.
    record = LoraRegistry(storage).get("dogs")
    assert record.id == result.lora.id == "dogs:1"
    manifest = record.manifest
    assert (manifest.base_model, manifest.method, manifest.trigger_word, manifest.rank) == (str(model), "lora", "sks", 4)
    assert (manifest.dataset_id, manifest.dataset_version) == (dataset_id, 1)
    assert manifest.hyperparameters["learning_rate"] == 1e-3 and manifest.hyperparameters["total_steps"] == 12
    assert manifest.metrics["resumed_from_steps"] == resumed and np.isfinite(manifest.metrics["loss"])
    assert manifest.validation_seeds == [0, 1]
    rendered = {(image["step"], image["seed"]) for image in manifest.validation_images}
    assert rendered == {(6, 0), (6, 1), (12, 0), (12, 1)}
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
    with pytest.raises(TrainConfigError) as raised:  # the checkpoint recorded how it was trained
        train(config.model_copy(update={"rank": 8}))
    assert raised.value.param == "rank" and "step 2" in raised.value.message

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
