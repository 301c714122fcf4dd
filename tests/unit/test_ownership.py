"""Issue 18, finding 4: every resource has an owner, and one tenant never reaches another's.

The app is built as the ingress builds it (typed args, the models' Limits, every API service over
a tmp storage and a fake queue; model handles that must never be reached), with three keys:
alice and bob (`generate`, `train`; each their own tenant) and root (`admin`).

alice makes one of everything: image jobs (their outputs), a synchronous output, a video, a
saved workflow and a workflow run, a dataset with an image and an import, a fine-tuning job and
a LoRA. Then **the walk**: every route of the OpenAPI spec, every method, with bob's key and
alice's ids in every path parameter. No answer may carry anything of alice's (her ids, keys,
names, prompt), every route that names one of her things answers 404 (existence does not leak),
and none of her things changes. The same walk with alice's key finds her things (so the markers
would be seen if they leaked), and root sees everything.
"""

from __future__ import annotations

import io
import re
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.auth import ApiKey, Caller, acting_as, hash_key, reset_caller
from storage.keys import output_key, owner_tag
from tests.keyed_app import keyed_app, png, safetensors_bytes

KEYS = {"alice": ("alice-key", ["generate", "train"]), "bob": ("bob-key", ["generate", "train"]),
        "root": ("root-key", ["admin"])}
SECRET_PROMPT = "alice-secret-prompt lighthouse"


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


class FakeRayJobs:
    """The fine-tuning service's Ray job client: knows no job (as after a cluster restart)."""

    stopped: list[str] = []

    def get_job_info(self, job_id):
        raise RuntimeError("status code 404: no such job")

    def get_job_logs(self, job_id):
        return ""

    def get_job_status(self, job_id):
        raise RuntimeError("status code 404")

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        return True


def workflow(prompt: str = SECRET_PROMPT) -> dict:
    return {"name": "alice-flow", "nodes": [
        {"id": "idea", "type": "prompt", "params": {"text": prompt}},
        {"id": "still", "type": "text_to_image", "params": {"size": "32x32", "steps": 2, "seed": 7}},
        {"id": "out", "type": "output", "params": {"name": "still"}}],
        "edges": [{"source": "idea", "source_port": "text", "target": "still", "target_port": "prompt"},
                  {"source": "still", "source_port": "images", "target": "out", "target_port": "value"}]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    built = keyed_app(tmp_path_factory.mktemp("storage"), KEYS, {"fine_tuning": {"enabled": True}})
    services = built.services
    services.fine_tuning.job_client = FakeRayJobs
    a = alice_things(built.client, services, services.files.storage)
    return {"client": built.client, "services": services, "storage": services.files.storage, "queue": built.queue,
            "alice": a}


def finish(services, job_id: str, outputs: list[str]) -> None:
    from storage.jobs import JobOutput

    services.jobs.jobs.update(job_id, status="completed", finished_at=time.time(), progress=100.0,
                              outputs=[JobOutput(key=k, content_type="image/png" if k.endswith(".png") else "video/mp4")
                                       for k in outputs])


def alice_things(client: TestClient, services, storage) -> dict[str, Any]:
    """One of everything, made through the API with alice's key where the API makes it."""
    ids: dict[str, Any] = {}
    # an image job, finished with an output file
    made = client.post("/v1/images/generations?async=true", headers=bearer("alice"),
                       json={"prompt": SECRET_PROMPT, "size": "64x64", "seed": 3})
    assert made.status_code == 202, made.text
    ids["job"] = made.json()["id"]
    ids["job_output"] = storage.put_bytes(output_key(ids["job"], 0), png(seed=1))
    finish(services, ids["job"], [ids["job_output"]])
    # a synchronous request's output (its id tagged with alice's tenant, as FilesService.output_id makes it)
    token = acting_as(Caller(owner="alice"))
    try:
        ids["sync_output"] = storage.put_bytes(output_key(services.files.output_id(), 0), png(seed=2))
    finally:
        reset_caller(token)
    assert owner_tag("alice") in ids["sync_output"]
    # a video (text to video), finished
    video = client.post("/v1/videos", headers=bearer("alice"), json={"prompt": SECRET_PROMPT, "seconds": "1", "fps": 4})
    assert video.status_code in (200, 202), video.text
    ids["video"] = video.json()["id"]
    ids["video_output"] = storage.put_bytes(output_key(f"{ids['video']}.video", 0, "mp4"), b"\x00\x00\x00\x18ftyp")
    finish(services, ids["video"], [ids["video_output"]])
    # a saved workflow, and a run of it
    saved = client.post("/v1/workflows", headers=bearer("alice"), json={"name": "alice-flow", "workflow": workflow()})
    assert saved.status_code in (200, 201), saved.text
    ids["workflow"] = saved.json()["id"]
    run = client.post("/v1/workflows/runs", headers=bearer("alice"), json={"workflow_id": ids["workflow"]})
    assert run.status_code == 202, run.text
    ids["workflow_run"] = run.json()["id"]
    # a dataset with one image, and an import into it
    dataset = client.post("/v1/datasets", headers=bearer("alice"), json={"name": "alice-faces"})
    assert dataset.status_code == 201, dataset.text
    ids["dataset"] = dataset.json()["id"]
    added = client.post(f"/v1/datasets/{ids['dataset']}/images", headers=bearer("alice"),
                        files=[("files", ("a.png", png(seed=3), "image/png"))])
    assert added.status_code == 200, added.text
    ids["dataset_image"] = services.datasets.store.sample_keys(ids["dataset"], 1)[0]
    imported = client.post(f"/v1/datasets/{ids['dataset']}/imports", headers=bearer("alice"),
                           json={"urls": ["https://images.example.com/a.png"]})
    assert imported.status_code == 202, imported.text
    ids["import"] = imported.json()["id"]
    # a LoRA registered by alice's training run, and her fine-tuning job's record
    from storage.registry import LoraManifest

    lora = services.models.loras.register(
        "alice-style", LoraManifest(base_model="m", rank=2, training_run="alice-style"),
        safetensors_bytes(["unet.down_blocks.0.attn1.to_q.lora.down.weight"]), owner="alice")
    ids["lora"] = lora.id
    preset = client.post("/v1/presets", headers=bearer("alice"),
                         json={"name": "alice-preset", "prompt": "alice-style-template {prompt}"})
    assert preset.status_code == 201, preset.text
    ids["preset"] = "alice-preset"
    ids["fine_tuning"] = "ftjob-alice0000000000000001"
    services.fine_tuning.store.put({
        "id": ids["fine_tuning"], "created_at": time.time(), "owner": "alice", "metadata": {"who": "alice-meta"},
        "config": {"run_name": "alice-style", "name": "alice-style", "base_model": "m", "method": "lora",
                   "seed": 1},
        "plan": {"dataset_id": ids["dataset"], "total_steps": 10}})
    return ids


def markers(ids: dict[str, Any]) -> list[str]:
    """What must never appear in an answer to bob: every id, key and name of alice's, and her prompt."""
    return [*(str(v) for v in ids.values()), "alice-faces", "alice-flow", "alice-style", "alice-meta",
            "alice-style-template", SECRET_PROMPT]


def path_values(ids: dict[str, Any]) -> dict[str, list[str]]:
    """alice's ids for each path parameter (by the route's prefix where a name is shared)."""
    return {
        "/v1/jobs/": [ids["job"], ids["video"], ids["import"], ids["workflow_run"]],
        "/v1/videos/": [ids["video"]],
        "/v1/files/": [ids["job_output"], ids["sync_output"], ids["video_output"], ids["dataset_image"]],
        "/v1/datasets/": [ids["dataset"]],
        "/v1/fine_tuning/jobs/": [ids["fine_tuning"]],
        "/v1/workflows/": [ids["workflow"]],
        "/v1/models/": [ids["lora"]],
        "/v1/presets/": [ids["preset"]],
    }


# Bodies that get past each write route's own checks of its body, so what answers is ownership.
BODIES: dict[tuple[str, str], dict] = {
    ("PUT", "/v1/workflows/{workflow_id}"): {"name": "bob-flow", "workflow": workflow("bob")},
    ("POST", "/v1/datasets/{dataset_id}/imports"): {"urls": ["https://images.example.com/b.png"]},
    ("POST", "/v1/datasets/{dataset_id}/collect"): {"result_ids": ["unsplash:bobs-pick"]},
    ("POST", "/v1/datasets/{dataset_id}/edits"): {"version": 1, "remove": ["0" * 64]},
    ("POST", "/v1/datasets/{dataset_id}/captions"): {"style": "tags", "overwrite": True},
    ("PUT", "/v1/presets/{name}"): {"name": "alice-preset", "prompt": "bob {prompt}"},
}


def walk(client: TestClient, who: str, ids: dict[str, Any]):
    """Every (method, path) of the spec with alice's ids in its parameters: (method, url, response)."""
    spec = client.get("/openapi.json", headers=bearer("root")).json()
    values = path_values(ids)
    for template, operations in spec["paths"].items():
        params = re.findall(r"{(\w+)}", template)
        if not params:
            urls = [template]
        else:
            assert len(params) == 1, f"{template}: the walk knows one path parameter per route; extend it"
            prefix = next((p for p in values if template.startswith(p)), None)
            assert prefix is not None, f"{template}: a new route with a path parameter; add alice's ids for it"
            urls = [template.replace(f"{{{params[0]}}}", value) for value in values[prefix]]
        for method, operation in operations.items():
            if method.upper() not in ("GET", "POST", "PUT", "DELETE"):
                continue
            content = (operation.get("requestBody") or {}).get("content") or {"application/json": {}}
            for url in urls:
                body = BODIES.get((method.upper(), template), {})
                if method.upper() == "DELETE" and template.startswith("/v1/datasets/"):
                    url += "?confirm=alice-faces"
                if method.upper() in ("POST", "PUT") and "application/json" not in content:  # a form route
                    response = client.request(method.upper(), url, headers=bearer(who),
                                              files=[("files", ("b.png", png(seed=9), "image/png"))])
                else:
                    response = client.request(method.upper(), url, headers=bearer(who),
                                              json=body if method.upper() in ("POST", "PUT") else None)
                yield method.upper(), template, url, response


def test_no_route_gives_bob_anything_of_alices(world):
    client, ids = world["client"], world["alice"]
    before = {k: world["services"].jobs.jobs.get(v).status for k, v in ids.items()
              if k in ("job", "video", "import", "workflow_run")}
    seen, leaks, not_404 = 0, [], []
    for method, template, url, response in walk(client, "bob", ids):
        seen += 1
        if template != "/readyz":  # the models here are unreachable on purpose: not ready
            assert response.status_code < 500, (method, url, response.status_code, response.text[:300])
        text = response.text
        found = [m for m in markers(ids) if m in text and m not in url]  # not what bob sent himself
        if found:
            leaks.append((method, url, response.status_code, found))
        if "{" in template and response.status_code != 404:
            not_404.append((method, url, response.status_code, text[:200]))
    assert seen > 40
    assert not leaks, leaks
    assert not not_404, not_404
    # nothing of alice's changed: her jobs keep their status, her things are all still there
    after = {k: world["services"].jobs.jobs.get(ids[k]).status for k in before}
    assert after == before
    for url in (f"/v1/workflows/{ids['workflow']}", f"/v1/datasets/{ids['dataset']}",
                f"/v1/files/{ids['dataset_image']}", f"/v1/videos/{ids['video']}"):
        assert client.get(url, headers=bearer("alice")).status_code == 200, url
    assert not FakeRayJobs.stopped


def test_alice_and_root_do_see_alices_things(world):
    """The markers the walk looks for are there when the caller may see them (the walk can fail)."""
    client, ids = world["client"], world["alice"]
    for who in ("alice", "root"):
        jobs = client.get("/v1/jobs?limit=100", headers=bearer(who)).text
        assert ids["job"] in jobs and ids["import"] in jobs
        assert ids["video"] in client.get("/v1/videos", headers=bearer(who)).text
        assert "alice-faces" in client.get("/v1/datasets", headers=bearer(who)).text
        assert "alice-flow" in client.get("/v1/workflows", headers=bearer(who)).text
        assert ids["fine_tuning"] in client.get("/v1/fine_tuning/jobs", headers=bearer(who)).text
        assert ids["lora"] in client.get("/v1/models", headers=bearer(who)).text
        for key in (ids["job_output"], ids["sync_output"], ids["dataset_image"]):
            file = client.get(f"/v1/files/{key}", headers=bearer(who))
            assert file.status_code == 200 and Image.open(io.BytesIO(file.content)).size == (64, 64), (who, key)
        assert SECRET_PROMPT in client.get(f"/v1/jobs/{ids['job']}", headers=bearer(who)).text
    # and bob's own lists do not have them
    assert ids["job"] not in client.get("/v1/jobs?limit=100", headers=bearer("bob")).text


def test_bob_cannot_use_alices_things_as_inputs(world):
    """Inputs by reference are reads too: an output key, a job id, a LoRA, a dataset, a name."""
    client, ids, queue = world["client"], world["alice"], world["queue"]
    sent = len(queue.sent)
    upscale = client.post("/v1/images/upscale?async=true", headers=bearer("bob"),
                          json={"image_key": ids["job_output"]})
    assert upscale.status_code == 400 and upscale.json()["error"]["param"] == "image_key", upscale.text
    video = client.post("/v1/videos", headers=bearer("bob"),
                        json={"prompt": "x", "input_reference_key": ids["sync_output"]})
    assert video.status_code == 400 and video.json()["error"]["param"] == "input_reference_key", video.text
    mine = client.post("/v1/datasets", headers=bearer("bob"), json={"name": "bob-set"}).json()["id"]
    for source, value in (("job_ids", ids["job"]), ("output_keys", ids["job_output"])):
        refused = client.post(f"/v1/datasets/{mine}/imports", headers=bearer("bob"), json={source: [value]})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == f"{source}.0", refused.text
    lora = client.post("/v1/images/generations?async=true", headers=bearer("bob"),
                       json={"prompt": "x", "lora": ids["lora"]})
    assert lora.status_code == 404 and lora.json()["error"]["param"] == "lora", lora.text
    missing = client.post("/v1/images/generations?async=true", headers=bearer("bob"),
                          json={"prompt": "x", "lora": "nobody-style:1"})
    # the same answer as for a LoRA that does not exist: existence does not leak
    assert lora.json()["error"]["message"].replace("alice-style", "nobody-style") == missing.json()["error"]["message"]
    image_node = {"name": "b", "nodes": [{"id": "img", "type": "image", "params": {"key": ids["job_output"]}},
                                         {"id": "out", "type": "output", "params": {"name": "i"}}],
                  "edges": [{"source": "img", "source_port": "image", "target": "out", "target_port": "value"}]}
    run = client.post("/v1/workflows/runs", headers=bearer("bob"), json={"workflow": image_node})
    assert run.status_code == 400 and "no stored output" in run.text, run.text
    assert len(queue.sent) == sent  # nothing was queued
    # alice can use her own output as an input
    assert client.post("/v1/images/upscale?async=true", headers=bearer("alice"),
                       json={"image_key": ids["job_output"]}).status_code == 202


def test_lora_names_and_dataset_names_are_per_owner(world):
    """A new version of another owner's LoRA name is refused; dataset names are per owner."""
    from storage.registry import LoraExistsError, LoraManifest

    services, client = world["services"], world["client"]
    weights = safetensors_bytes(["unet.down_blocks.0.attn1.to_q.lora.down.weight"])
    with pytest.raises(LoraExistsError) as taken:
        services.models.loras.register("alice-style", LoraManifest(base_model="m", rank=2), weights,
                                       new_version=True, owner="bob")
    assert taken.value.param == "name"
    assert services.models.loras.register("alice-style", LoraManifest(base_model="m", rank=2), weights,
                                          new_version=True, owner="alice").version == 2
    # bob's dataset of the same name as alice's is his own
    same = client.post("/v1/datasets", headers=bearer("bob"), json={"name": "alice-faces"})
    assert same.status_code == 201, same.text
    assert same.json()["id"] != world["alice"]["dataset"]
    again = client.post("/v1/datasets", headers=bearer("bob"), json={"name": "alice-faces"})
    assert again.status_code == 409


def test_a_public_dataset_is_readable_by_all_and_writable_by_its_owner(world):
    client = world["client"]
    made = client.post("/v1/datasets", headers=bearer("alice"), json={"name": "alice-open", "public": True})
    dataset = made.json()["id"]
    client.post(f"/v1/datasets/{dataset}/images", headers=bearer("alice"),
                files=[("files", ("a.png", png(seed=5), "image/png"))])
    assert client.get(f"/v1/datasets/{dataset}", headers=bearer("bob")).status_code == 200
    assert dataset in client.get("/v1/datasets", headers=bearer("bob")).text
    key = world["services"].datasets.store.sample_keys(dataset, 1)[0]
    assert client.get(f"/v1/files/{key}", headers=bearer("bob")).status_code == 200
    refused = client.post(f"/v1/datasets/{dataset}/imports", headers=bearer("bob"),
                          json={"urls": ["https://images.example.com/c.png"]})
    assert refused.status_code == 403, refused.text
    assert client.delete(f"/v1/datasets/{dataset}?confirm=alice-open", headers=bearer("bob")).status_code == 403
    assert client.get(f"/v1/datasets/{dataset}", headers=bearer("alice")).status_code == 200


def test_bob_cannot_train_on_alices_dataset_or_into_her_lora_name(world):
    client, ids = world["client"], world["alice"]
    mine = client.post("/v1/datasets", headers=bearer("bob"), json={"name": "bob-train"}).json()["id"]
    client.post(f"/v1/datasets/{mine}/images", headers=bearer("bob"),
                files=[("files", (f"{i}.png", png(seed=10 + i), "image/png")) for i in range(4)])
    model = world["services"].models.sdxl.model
    theirs = client.post("/v1/fine_tuning/jobs", headers=bearer("bob"),
                         json={"model": model, "training_file": ids["dataset"], "hyperparameters": {"min_images": 1, "max_steps": 2}})
    assert theirs.status_code == 400 and theirs.json()["error"]["param"] == "training_file", theirs.text
    name = client.post("/v1/fine_tuning/jobs", headers=bearer("bob"),
                       json={"model": model, "training_file": mine, "suffix": "alice-style", "new_version": True,
                             "hyperparameters": {"min_images": 1, "max_steps": 2}})
    assert name.status_code == 409 and name.json()["error"]["param"] == "suffix", name.text


def test_keys_of_one_owner_share_its_things(tmp_path):
    """`owner` on a key: two keys of one team see the same jobs; a key without one is its own tenant."""
    from api.auth import AuthConfig

    config = AuthConfig.model_validate({"keys": [
        {"name": "ci", "sha256": hash_key("k1"), "scopes": ["generate"], "owner": "team-a"},
        {"name": "laptop", "sha256": hash_key("k2"), "scopes": ["generate"], "owner": "team-a"},
        {"name": "solo", "sha256": hash_key("k3"), "scopes": ["generate"]}]})
    tenants = [key.tenant for key in config.enforced_keys()]
    assert tenants == ["team-a", "team-a", "solo"]
    with pytest.raises(ValueError):
        ApiKey(name="x", sha256=hash_key("k"), scopes=["read"], owner="a/b")
