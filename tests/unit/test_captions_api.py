"""POST /v1/datasets/{id}/captions without Ray: the app as the ingress builds it (tests/keyed_app.py),
a fake queue, and the LLM's limits (its name is what the job asks for). What the route checks and
what it records; the job itself is tests/unit/test_captions.py's."""

from __future__ import annotations

import pytest

from deployments.llm.contract import GemmaLimits
from graphs.payloads import DatasetCaptionsPayload, parse_record
from tests.keyed_app import keyed_app, png

KEYS = {"alice": ("alice-key", ["generate", "train"]), "bob": ("bob-key", ["generate", "train"]),
        "trainer": ("trainer-key", ["train"])}


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    built = keyed_app(tmp_path_factory.mktemp("storage"), KEYS)
    built.services.datasets.llm = GemmaLimits(model="gemma", source="models/tiny/gemma", max_model_len=512)
    client = built.client
    made = client.post("/v1/datasets", headers=bearer("alice"), json={"name": "faces", "trigger_word": "sks"})
    dataset = made.json()["id"]
    for seed in (1, 2):  # two versions
        added = client.post(f"/v1/datasets/{dataset}/images", headers=bearer("alice"),
                            files=[("files", (f"{seed}.png", png(seed=seed), "image/png"))])
        assert added.status_code == 200, added.text
    empty = client.post("/v1/datasets", headers=bearer("alice"), json={"name": "empty"}).json()["id"]
    public = client.post("/v1/datasets", headers=bearer("alice"), json={"name": "open", "public": True}).json()["id"]
    client.post(f"/v1/datasets/{public}/images", headers=bearer("alice"),
                files=[("files", ("p.png", png(seed=3), "image/png"))])
    return {"built": built, "client": client, "dataset": dataset, "empty": empty, "public": public}


def recorded(world, job_id: str) -> DatasetCaptionsPayload:
    return parse_record(world["built"].services.jobs.jobs.get(job_id))


def test_a_caption_job_is_accepted_with_everything_pinned(world):
    client, queue = world["client"], world["built"].queue
    sent = len(queue.sent)
    response = client.post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("alice"),
                           json={"style": "tags", "max_images": 10})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["object"] == "job" and job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert queue.sent[sent:] == [job["id"]]
    payload = recorded(world, job["id"])
    assert isinstance(payload, DatasetCaptionsPayload)
    assert (payload.dataset_id, payload.version, payload.overwrite, payload.trigger_word, payload.model,
            payload.max_images) == (world["dataset"], 2, False, "sks", "gemma", 10)  # latest version, dataset's word
    assert payload.settings.style == "tags" and payload.settings.instruction is None


def test_version_trigger_word_and_instruction_as_asked(world):
    response = world["client"].post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("alice"), json={
        "version": 1, "overwrite": True, "trigger_word": "", "instruction": "Name the colours only."})
    assert response.status_code == 202, response.text
    payload = recorded(world, response.json()["id"])
    assert (payload.version, payload.overwrite, payload.trigger_word) == (1, True, None)  # "": no trigger word
    assert payload.settings.instruction == "Name the colours only." and payload.settings.style == "sentence"
    other = world["client"].post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("alice"),
                                 json={"trigger_word": "  zxq "})
    assert recorded(world, other.json()["id"]).trigger_word == "zxq"


@pytest.mark.parametrize("body,param", [
    ({"style": "poem"}, "style"),
    ({"version": 0}, "version"),
    ({"version": 3}, "version"),  # the dataset has 2
    ({"version": "latest"}, "version"),
    ({"overwrite": "maybe"}, "overwrite"),
    ({"trigger_word": "two\nlines"}, "trigger_word"),
    ({"trigger_word": "x" * 101}, "trigger_word"),
    ({"instruction": ""}, "instruction"),
    ({"instruction": "x" * 1001}, "instruction"),
    ({"max_images": 0}, "max_images"),
    ({"colour": "red"}, "colour"),
])
def test_bad_input_is_a_400_naming_the_field(world, body, param):
    sent = len(world["built"].queue.sent)
    response = world["client"].post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("alice"), json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param, response.text
    assert len(world["built"].queue.sent) == sent


def test_an_empty_dataset_has_nothing_to_caption(world):
    response = world["client"].post(f"/v1/datasets/{world['empty']}/captions", headers=bearer("alice"), json={})
    assert response.status_code == 400 and response.json()["error"]["param"] == "version", response.text


def test_another_owners_dataset_is_404_and_a_public_one_403(world):
    client = world["client"]
    theirs = client.post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("bob"), json={})
    assert theirs.status_code == 404 and world["dataset"] in theirs.json()["error"]["message"]
    missing = client.post("/v1/datasets/ds_nope/captions", headers=bearer("bob"), json={})
    assert missing.status_code == 404
    assert theirs.json()["error"]["message"].replace(world["dataset"], "ds_nope") == missing.json()["error"]["message"]
    public = client.post(f"/v1/datasets/{world['public']}/captions", headers=bearer("bob"), json={})
    assert public.status_code == 403 and public.json()["error"]["param"] == "dataset_id", public.text


def test_a_train_key_cancels_and_replays_its_caption_job(world):
    client = world["client"]
    made = client.post("/v1/datasets", headers=bearer("trainer"), json={"name": "mine"}).json()["id"]
    client.post(f"/v1/datasets/{made}/images", headers=bearer("trainer"),
                files=[("files", ("t.png", png(seed=7), "image/png"))])
    job = client.post(f"/v1/datasets/{made}/captions", headers=bearer("trainer"), json={}).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer("trainer"))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
    replayed = client.post(f"/v1/jobs/{job['id']}/replay", headers=bearer("trainer"))
    assert replayed.status_code == 202, replayed.text
    again = recorded(world, replayed.json()["id"])
    assert again.replay_of == job["id"] and again.dataset_id == made and again.model == "gemma"


def test_without_a_language_model_there_are_no_captions(world):
    datasets = world["built"].services.datasets
    llm, datasets.llm = datasets.llm, None
    try:
        response = world["client"].post(f"/v1/datasets/{world['dataset']}/captions", headers=bearer("alice"), json={})
    finally:
        datasets.llm = llm
    assert response.status_code == 404 and response.json()["error"]["param"] == "model", response.text
