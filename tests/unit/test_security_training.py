"""Security of fine-tuning (issue 18): S3 credentials stay out of the Ray job's entrypoint, records and
logs (12a); checkpoints never unpickle code (12b); a request's validation and class-image work is
capped (8). No Ray cluster and no model: a fake Ray job client, a placeholder SDXL folder."""

from __future__ import annotations

import io
import json
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage import Storage
from storage.datasets import DatasetStore, ImageItem

ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "s3cr3t-wJalrXUtnFEMI-K7MDENG"
OPTIONS = {"key": ACCESS_KEY, "secret": SECRET, "client_kwargs": {"region_name": "eu-west-1"}}
SECRETS = (ACCESS_KEY, SECRET)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (72, 80, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [s for s in SECRETS if s.encode() in data]


class RecordingJobClient:
    """Ray's JobSubmissionClient as the service uses it; keeps what was submitted."""

    def __init__(self):
        self.submitted: list[dict] = []

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict) -> str:
        self.submitted.append({"entrypoint": entrypoint, "submission_id": submission_id, "runtime_env": runtime_env,
                               "metadata": metadata})
        return submission_id

    def get_job_info(self, job_id: str):
        from types import SimpleNamespace

        return SimpleNamespace(status="PENDING", message="", end_time=None)

    def get_job_logs(self, job_id: str) -> str:
        return ""


@pytest.fixture()
def root(tmp_path):
    """A storage root with an 8-image dataset, and a placeholder SDXL folder: ``(storage, dataset id, model)``."""
    storage = Storage(str(tmp_path / "root"))
    store = DatasetStore(storage)
    dataset_id = store.create("dogs", trigger_word="sks").id
    store.add_images(dataset_id, [ImageItem(f"{i}.png", png(i)) for i in range(8)])
    model = tmp_path / "sdxl"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return storage, dataset_id, model


@pytest.fixture()
def api(root):
    """``(TestClient, RecordingJobClient, storage, dataset id, configure)``: the fine-tuning routes over the real
    FineTuningService, with the app's storage_options holding S3 credentials."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from api.errors import add_error_handlers
    from api.fine_tuning.router import router
    from api.fine_tuning.service import FineTuningConfig, FineTuningService
    from deployments.sdxl.contract import SDXLLimits
    from storage.fine_tuning import FineTuningStore

    storage, dataset_id, model = root
    jobs = RecordingJobClient()
    base = SDXLLimits.from_config({"model": str(model)}, styles={})
    defaults = {"resolution": 64, "max_steps": 8, "num_workers": 1, "cpus_per_worker": 0.5}
    app = FastAPI()
    add_error_handlers(app)
    app.include_router(router)

    def configure(**settings):
        config = FineTuningConfig(**{"defaults": defaults, **settings})
        app.state.fine_tuning = FineTuningService(FineTuningStore(storage), storage, config, base, storage.root,
                                                  dict(OPTIONS), job_client=lambda: jobs, nodes=lambda: None)

    configure()
    return TestClient(app, raise_server_exceptions=False), jobs, storage, dataset_id, configure


def post_job(client, dataset_id: str, **fields):
    return client.post("/v1/fine_tuning/jobs", json={"model": "sdxl", "training_file": dataset_id, **fields})


# --- 12a: S3 credentials --------------------------------------------------------------------------------


def test_storage_credentials_stay_out_of_the_entrypoint_record_and_metadata(api, monkeypatch, capsys):
    import training.cli
    from training.config import TrainConfig

    client, jobs, storage, dataset_id, _ = api
    response = post_job(client, dataset_id, suffix="dogs", metadata={"team": "a"})
    assert response.status_code == 200, response.text
    assert not leaks(response.text)
    [submitted] = jobs.submitted

    # 1. Nothing the Ray job shows (`ray job list`, process lists, the driver's log) holds them.
    entrypoint = submitted["entrypoint"]
    assert not leaks(entrypoint), entrypoint
    assert not leaks(json.dumps(submitted["metadata"]))
    # the entrypoint is still one shell-quoted JSON argument
    argv = shlex.split(entrypoint)
    assert argv[1:4] == ["-m", "training.cli", "--config-json"] and len(argv) == 5
    assert "storage_options" not in json.loads(argv[4])

    # 2. Nor does any object the service stored (the job record, the run claim) or any answer.
    stored = [p for p in Path(storage.root).rglob("*") if p.is_file()]
    assert any("fine_tuning/jobs/" in str(p) for p in stored)
    for path in stored:
        assert not leaks(path.read_bytes()), path
    for url in ("/v1/fine_tuning/jobs", f"/v1/fine_tuning/jobs/{response.json()['id']}",
                f"/v1/fine_tuning/jobs/{response.json()['id']}/events"):
        assert not leaks(client.get(url).text), url

    # 3. They travel in the job's runtime_env, and the entrypoint reads them back from there.
    env = submitted["runtime_env"]["env_vars"]
    assert json.loads(env["ATELIER_STORAGE_OPTIONS"]) == OPTIONS
    seen: list[TrainConfig] = []

    def fake_train(config):
        seen.append(config)
        raise training.cli.TrainConfigError("stop here", "dataset_id")

    monkeypatch.setattr(training.cli, "train", fake_train)
    monkeypatch.setenv("ATELIER_STORAGE_OPTIONS", env["ATELIER_STORAGE_OPTIONS"])
    assert training.cli.main(argv[3:]) == 2
    assert seen and seen[0].storage_options == OPTIONS and seen[0].storage_root == storage.root
    out = capsys.readouterr()
    assert not leaks(out.out + out.err)


def test_the_cli_refuses_malformed_storage_options_without_echoing_them(monkeypatch, capsys):
    import training.cli

    monkeypatch.setenv("ATELIER_STORAGE_OPTIONS", '{"secret": "' + SECRET + '"')  # cut short: not JSON
    config = json.dumps({"name": "dogs", "base_model": "m", "dataset_id": "d", "max_steps": 2})
    assert training.cli.main(["--config-json", config]) == 2
    err = capsys.readouterr().err
    assert json.loads(err)["error"]["param"] == "storage_options" and not leaks(err)


def test_a_train_config_never_shows_its_storage_options(root):
    from training.config import TrainConfig, load_config
    from training.plan import job_entrypoint

    storage, dataset_id, model = root
    config = load_config({"name": "dogs", "base_model": str(model), "dataset_id": dataset_id, "max_steps": 2,
                          "storage_root": storage.root, "storage_options": OPTIONS})
    assert config.storage_options == OPTIONS
    for shown in (repr(config), str(config), config.model_dump_json(), json.dumps(config.model_dump(mode="json")),
                  job_entrypoint(config)):
        assert not leaks(shown), shown
    # a config passed on keeps them (load_config of a TrainConfig, model_copy)
    assert load_config(config).storage_options == OPTIONS
    assert config.model_copy(update={"run_name": "x"}).storage_options == OPTIONS
    assert TrainConfig.model_validate(config.model_dump()).storage_options == {}


def test_the_training_driver_hands_workers_no_credentials_in_the_loop_config(root, monkeypatch):
    """Ray Train records ``train_loop_config`` in its run state (the dashboard's Train page, exported
    events): the storage options reach the workers through the object store instead."""
    import ray
    import ray.train.torch
    from ray.train.v2._internal.state.schema import _to_json_serializable_value

    import training.loop
    from training.config import load_config
    from training.plan import read_status

    storage, dataset_id, model = root
    config = load_config({"name": "dogs", "base_model": str(model), "dataset_id": dataset_id, "max_steps": 2,
                          "resolution": 64, "storage_root": storage.root, "storage_options": OPTIONS})
    captured: dict = {}
    objects: dict = {}

    class Ref:  # what ray.put returns, as Ray Train's state shows it
        def __repr__(self):
            return "ObjectRef(0001)"

    def put(value):
        ref = Ref()
        objects[id(ref)] = (ref, value)
        return ref

    class FakeTrainer:
        def __init__(self, train_loop_per_worker, *, train_loop_config, **kwargs):
            captured.update(train_loop_config=train_loop_config, fn=train_loop_per_worker)

        def fit(self):
            raise RuntimeError("stopped before training")

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "put", put)
    monkeypatch.setattr(ray, "get", lambda ref: objects[id(ref)][1])
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.setattr(training.loop, "_instance_dataset", lambda config, plan: "dataset")
    with pytest.raises(RuntimeError, match="stopped before training"):
        training.loop.train(config)

    loop_config = captured["train_loop_config"]
    assert not leaks(json.dumps(_to_json_serializable_value(loop_config)))
    assert not leaks(repr(captured["fn"]))
    assert training.loop._worker_config(loop_config).storage_options == OPTIONS  # what each worker builds
    assert not leaks(read_status(storage, "dogs").model_dump_json())


# --- 12b: checkpoints -----------------------------------------------------------------------------------


class _WritesAFile:
    """Unpickling this creates ``path`` (``open(path, "w")``): code run by loading a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _training_objects():
    import torch
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    trainable = {"unet": {"a.lora_A.weight": torch.nn.Parameter(torch.randn(4, 8)),
                          "a.lora_B.weight": torch.nn.Parameter(torch.randn(8, 4))},
                 "text_encoder": {"q.lora_A.weight": torch.nn.Parameter(torch.randn(2, 8))}}
    groups = [{"params": list(trainable["unet"].values()), "lr": 1e-3},
              {"params": list(trainable["text_encoder"].values()), "lr": 5e-4}]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    return trainable, optimizer, get_scheduler


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    from training.loop import _load_checkpoint

    trainable, optimizer, get_scheduler = _training_objects()
    scheduler = get_scheduler("constant", optimizer)
    folder = tmp_path / "checkpoint_00000002"
    folder.mkdir()
    save_file({f"{m}.{n}": p.detach().contiguous() for m, ps in trainable.items() for n, p in ps.items()},
              str(folder / "lora.safetensors"))
    (folder / "state.json").write_text(json.dumps({"step": 2}))
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _WritesAFile(str(marker)), "lr_scheduler": scheduler.state_dict(), "scaler": None},
               str(folder / "optimizer.pt"))

    with pytest.raises(Exception, match="(?i)weights_only|unsupported global|refus"):
        _load_checkpoint(str(folder), trainable, optimizer, scheduler, None)
    assert not marker.exists(), "loading the checkpoint ran code from it"


@pytest.mark.parametrize("lr_scheduler", ["constant", "constant_with_warmup", "linear", "cosine",
                                          "cosine_with_restarts", "polynomial"])
def test_checkpoints_resume_with_weights_only_loading(tmp_path, lr_scheduler):
    """What a checkpoint holds (AdamW, each scheduler, the fp16 GradScaler) loads with weights_only=True."""
    import torch

    from training.loop import _load_checkpoint, _save_checkpoint

    trainable, optimizer, get_scheduler = _training_objects()
    scheduler = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=2, num_training_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    params = [p for ps in trainable.values() for p in ps.values()]
    for _ in range(3):
        loss = sum((p**2).sum() for p in params)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad()
    _save_checkpoint(str(tmp_path), trainable, optimizer, scheduler, scaler,
                     {"step": 3, "resumed_from_steps": [], "config": {"rank": 4}})

    fresh, optimizer2, _ = _training_objects()
    scheduler2 = get_scheduler(lr_scheduler, optimizer2, num_warmup_steps=2, num_training_steps=10)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=1.0)
    state = _load_checkpoint(str(tmp_path), fresh, optimizer2, scheduler2, scaler2)
    assert state["step"] == 3 and state["config"] == {"rank": 4}
    for m, ps in trainable.items():
        for n, p in ps.items():
            assert torch.equal(fresh[m][n], p)
    assert scheduler2.last_epoch == scheduler.last_epoch == 3 and scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert scaler2.get_scale() == scaler.get_scale()
    saved, loaded = optimizer.state_dict(), optimizer2.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for index, values in saved["state"].items():
        for key, value in values.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)


# --- 8: validation and class-image work per request -----------------------------------------------------


@pytest.mark.parametrize("hyper, param", [
    ({"num_class_images": 5000}, "num_class_images"),
    ({"class_inference_steps": 200}, "class_inference_steps"),
    ({"validation_seeds": list(range(16))}, "validation_seeds"),
    ({"validation_inference_steps": 200}, "validation_inference_steps"),
    ({"max_steps": 100, "validation_every_steps": 1, "validation_seeds": [0]}, "validation_every_steps"),
    ({"max_steps": 200, "checkpoint_every_steps": 1}, "checkpoint_every_steps"),
])
def test_validation_and_class_image_work_is_capped(api, hyper, param):
    client, jobs, storage, dataset_id, configure = api
    configure(limits={"max_steps": 1000})  # the default caps of everything else
    body = {"suffix": "dogs", "hyperparameters": hyper}
    if "num_class_images" in hyper or "class_inference_steps" in hyper:
        body.update(method="dreambooth", class_prompt="a photo of a dog")
    response = post_job(client, dataset_id, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == f"hyperparameters.{param}", error
    assert param in error["message"] and "at most" in error["message"], error
    assert not jobs.submitted and not storage.list("fine_tuning/jobs/")


def test_the_caps_come_from_the_config_and_work_within_them_is_accepted(api):
    client, jobs, storage, dataset_id, configure = api
    # the operator's defaults sit within the operator's limits (TrainConfig's 25 steps would not)
    configure(defaults={"resolution": 64, "max_steps": 8, "num_workers": 1, "cpus_per_worker": 0.5,
                        "validation_inference_steps": 4, "class_inference_steps": 4, "num_class_images": 4},
              limits={"num_class_images": 8, "class_inference_steps": 10, "validation_images": 2,
                      "validation_inference_steps": 10, "validation_renders": 3, "checkpoints": 4})
    dreambooth = {"method": "dreambooth", "class_prompt": "a photo of a dog"}
    for body, param in [({**dreambooth, "hyperparameters": {"num_class_images": 9}}, "num_class_images"),
                        ({**dreambooth, "hyperparameters": {"class_inference_steps": 11}}, "class_inference_steps"),
                        ({"hyperparameters": {"validation_seeds": [0, 1, 2]}}, "validation_seeds"),
                        ({"hyperparameters": {"validation_inference_steps": 11}}, "validation_inference_steps"),
                        ({"hyperparameters": {"validation_every_steps": 2}}, "validation_every_steps"),  # 4 renders
                        ({"hyperparameters": {"checkpoint_every_steps": 1}}, "checkpoint_every_steps")]:
        response = post_job(client, dataset_id, suffix="dogs", **body)
        assert response.status_code == 400 and response.json()["error"]["param"] == f"hyperparameters.{param}", (
            body, response.text)

    ok = post_job(client, dataset_id, suffix="dogs", **dreambooth, hyperparameters={
        "num_class_images": 8, "class_inference_steps": 10, "validation_seeds": [0, 1],
        "validation_inference_steps": 10, "validation_every_steps": 3, "checkpoint_every_steps": 2})
    assert ok.status_code == 200, ok.text
    assert len(jobs.submitted) == 1


def test_limits_refuse_unknown_keys():
    from pydantic import ValidationError

    from api.fine_tuning.service import FineTuningLimits

    with pytest.raises(ValidationError):
        FineTuningLimits(validation_image=3)
    assert FineTuningLimits().validation_renders >= 1


def test_job_records_never_hold_storage_credentials(tmp_path):
    """Defence in depth: the record store drops config.storage_options on write, and on reading a record
    written before credentials were kept out of records."""
    from storage.fine_tuning import FineTuningStore

    storage = Storage(str(tmp_path / "root"))
    store = FineTuningStore(storage)
    record = {"id": "ftjob-abc", "created_at": 1.0, "config": {"name": "dogs", "storage_options": OPTIONS},
              "plan": {}, "metadata": None}
    store.put(record)
    assert not leaks(storage.get_bytes(store.record_key("ftjob-abc")))
    storage.put_json(store.record_key("ftjob-old"), {**record, "id": "ftjob-old"})  # written before the fix
    assert not leaks(json.dumps(store.get("ftjob-old")))
    assert not leaks(json.dumps(store.list())) and len(store.list()) == 2
    assert store.get("ftjob-abc")["config"] == {"name": "dogs"}
