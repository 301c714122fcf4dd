"""POST/GET /v1/fine_tuning/jobs as the Datasets page's training form uses them (issue 22, item 6):
DreamBooth with its class prompt, the main hyperparameters checked with a 400 naming the field,
epoch / learning rate / samples per second in the job view and its events, and validation images
listed as result files and served by the job. The real FineTuningService over local storage, with
an injected Ray job client (no Ray here; the run's status.json is written as rank 0 writes it).
"""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from tests.unit.test_training import FakeJobClient, api, dataset, error_of, model, post_job  # noqa: F401 (fixtures)
from training.plan import RunStatus, run_prefix, status_key


class LoggingJobClient(FakeJobClient):
    def __init__(self):
        super().__init__()
        self.logs = ""

    def get_job_logs(self, job_id: str) -> str:
        return self.logs


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def logged(api):
    client, _, storage, dataset_id, _ = api
    jobs = LoggingJobClient()
    client.app.state.fine_tuning.job_client = lambda: jobs
    return client, jobs, storage, dataset_id


@pytest.mark.parametrize("fields, param", [
    ({"hyperparameters": {"learning_rate": 2}}, "hyperparameters.learning_rate"),  # a typo for 2e-4
    ({"hyperparameters": {"learning_rate": 0}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"learning_rate": "fast"}}, "hyperparameters.learning_rate"),
    ({"hyperparameters": {"max_steps": 0}}, "hyperparameters.max_steps"),
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": 9}}, "hyperparameters.batch_size"),  # 8 images, one worker
    ({"hyperparameters": {"rank": 0}}, "hyperparameters.rank"),
    ({"hyperparameters": {"rank": 1000}}, "hyperparameters.rank"),  # over the app's limit (256), under 1024
    ({"hyperparameters": {"resolution": 100}}, "hyperparameters.resolution"),
    ({"hyperparameters": {"resolution": 56}}, "hyperparameters.resolution"),
    ({"method": "dreambooth"}, "class_prompt"),
    ({"method": "dreambooth", "class_prompt": "  "}, "class_prompt"),
    ({"method": "textual_inversion"}, "method"),
])
def test_the_training_forms_fields_are_checked_by_the_api(api, fields, param):
    client, jobs, storage, dataset_id, _ = api
    error = error_of(post_job(client, dataset_id, suffix="dogs", **fields), 400, param)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert jobs.status == {} and storage.list("fine_tuning/jobs/") == []  # nothing submitted


def test_a_dreambooth_run_with_its_class_prompt_and_hyperparameters_is_submitted(api):
    client, jobs, storage, dataset_id, _ = api
    hyper = {"learning_rate": 5e-4, "n_epochs": 2, "batch_size": 2, "rank": 8, "resolution": 64}
    response = post_job(client, dataset_id, suffix="dogs", method="dreambooth", class_prompt="a photo of a dog",
                        instance_prompt="a photo of {trigger_word} dog", hyperparameters=hyper)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["method"]["type"] == "dreambooth" and list(jobs.status) == [job["id"]]
    assert {k: job["hyperparameters"][k] for k in ("learning_rate", "epochs", "batch_size", "rank", "resolution")} == {
        "learning_rate": 5e-4, "epochs": 2, "batch_size": 2, "rank": 8, "resolution": 64}
    assert job["hyperparameters"]["max_steps"] is None  # epochs asked for: the default step count gives way
    # 8 images, one worker, batches of 2: 4 steps an epoch, 2 epochs
    assert (job["total_steps"], job["epochs"], job["epoch"]) == (8, 2, None)
    assert job["validation_prompt"] == "a photo of sks dog"
    record = storage.get_json(f"fine_tuning/jobs/{job['id']}.json")
    assert (record["config"]["class_prompt"], record["config"]["method"]) == ("a photo of a dog", "dreambooth")


def test_the_job_shows_epoch_learning_rate_samples_per_s_and_its_validation_images(logged):
    client, jobs, storage, dataset_id = logged
    job = post_job(client, dataset_id, suffix="dogs", validation_prompt="a dog on a sofa",
                   hyperparameters={"max_steps": 12, "validation_seeds": [0, 1]}).json()
    assert (job["total_steps"], job["epochs"], job["epoch"], job["result_files"]) == (12, 2, None, [])
    assert job["learning_rate"] is None and job["samples_per_s"] is None and job["validation_images"] == []

    # rank 0's status after step 9, with the renders of step 8 (validation_every_steps) and a stray file
    prefix = run_prefix("dogs")
    rendered = {}
    for seed, color in ((0, (200, 30, 30)), (1, (30, 30, 200))):
        key = f"{prefix}validation/step-000008/seed-{seed}.png"
        storage.put_bytes(key, png(color), "image/png")
        rendered[seed] = {"step": 8, "seed": seed, "key": key}
    storage.put_bytes(f"{prefix}notes.txt", b"not a result file")
    status = RunStatus(name="dogs", run_name="dogs", state="training", step=9, total_steps=12, loss=0.25,
                       learning_rate=1e-3, samples_per_s=3.5, updated_at=time.time(),
                       validation_images=[rendered[1], rendered[0]])
    storage.put_json(status_key("dogs"), status.model_dump(mode="json"))
    jobs.status[job["id"]] = "RUNNING"

    view = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert (view["status"], view["step"], view["epoch"], view["epochs"]) == ("running", 9, 2, 2)
    assert (view["learning_rate"], view["samples_per_s"], view["loss"]) == (1e-3, 3.5, 0.25)
    assert view["validation_prompt"] == "a dog on a sofa"
    files = ["validation/step-000008/seed-0.png", "validation/step-000008/seed-1.png"]
    assert view["result_files"] == files
    assert [(i["step"], i["seed"], i["file"]) for i in view["validation_images"]] == [(8, 0, files[0]),
                                                                                      (8, 1, files[1])]
    listed = client.get("/v1/fine_tuning/jobs").json()["data"][0]
    assert listed["result_files"] == files and listed["epoch"] == 2

    # each image downloads from its url, as the PNG the run stored
    for image, color in zip(view["validation_images"], ((200, 30, 30), (30, 30, 200))):
        response = client.get(image["url"])
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        name = f"{job['id']}-validation-step-000008-seed-{image['seed']}.png"
        assert response.headers["content-disposition"] == f'inline; filename="{name}"'
        decoded = Image.open(io.BytesIO(response.content)).convert("RGB")
        assert decoded.size == (64, 64) and decoded.getpixel((10, 10)) == color

    # only the files the job lists: not the run's other files, nor another path
    files_url = f"/v1/fine_tuning/jobs/{job['id']}/files"
    for name in ("notes.txt", "status.json", "validation/step-000008/seed-7.png", "../dogs/status.json",
                 "validation/step-000008/../../dogs/status.json"):
        error_of(client.get(files_url, params={"name": name}), 404, "file")
    error_of(client.get(files_url), 400, "name")
    error_of(client.get("/v1/fine_tuning/jobs/ftjob-nope/files", params={"name": files[0]}), 404,
             "fine_tuning_job_id")


def test_step_lines_become_metrics_events_with_epoch_learning_rate_and_samples_per_s(logged):
    client, jobs, _, dataset_id = logged
    job = post_job(client, dataset_id, suffix="dogs").json()
    jobs.status[job["id"]] = "RUNNING"
    # as training/loop.py prints them (through Ray's worker prefix), and a line of a run from before epochs
    jobs.logs = "\n".join([
        "(RayTrainWorker pid=1) [dogs] step 1/8 loss 0.5000 lr 1.00e-03 epoch 1/2 warming up",
        "(RayTrainWorker pid=1) [dogs] step 2/8 loss 0.2500 lr 5.00e-04 epoch 1/2 2.75 samples/s",
        "(RayTrainWorker pid=1) [dogs] step 5/8 loss 0.1250 lr 2.50e-04 epoch 2/2 3.10 samples/s",
        "[dogs] step 6/8 loss 0.1000",
        "[dogs] validation images at step 8: 1",
    ])
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    metrics = [e["data"] for e in reversed(events) if e["type"] == "metrics"]
    assert metrics == [
        {"step": 1, "total_steps": 8, "train_loss": 0.5, "learning_rate": 1e-3, "epoch": 1, "epochs": 2},
        {"step": 2, "total_steps": 8, "train_loss": 0.25, "learning_rate": 5e-4, "epoch": 1, "epochs": 2,
         "samples_per_s": 2.75},
        {"step": 5, "total_steps": 8, "train_loss": 0.125, "learning_rate": 2.5e-4, "epoch": 2, "epochs": 2,
         "samples_per_s": 3.1},
        {"step": 6, "total_steps": 8, "train_loss": 0.1},
    ]
    assert events[0]["message"] == "validation images at step 8: 1" and events[0]["type"] == "message"
