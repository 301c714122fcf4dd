"""User workflows on the running app: execution across deployments, concurrency, cache, cancel, replay."""

from __future__ import annotations

import io
import json
import time
import uuid

import httpx
import imageio.v3 as iio
import pytest
from PIL import Image

from tests.serve.helpers import read_events, wait_for_job

pytestmark = pytest.mark.serve


def node(id_, type_, **params):
    return {"id": id_, "type": type_, "params": params}


def edge(source, source_port, target, target_port):
    return {"source": source, "source_port": source_port, "target": target, "target_port": target_port}


def branch(name: str, seed: int, steps: int = 2) -> tuple[list, list]:
    """prompt.text → t2i → select → upscale → output, for one seed."""
    nodes = [node(f"t2i_{name}", "text_to_image", size="32x32", steps=steps, seed=seed),
             node(f"pick_{name}", "select", index=0), node(f"up_{name}", "upscale", steps=2, seed=seed),
             node(f"out_{name}", "output", name=name)]
    edges = [edge("prompt", "text", f"t2i_{name}", "prompt"), edge(f"t2i_{name}", "images", f"pick_{name}", "images"),
             edge(f"pick_{name}", "image", f"up_{name}", "image"), edge(f"up_{name}", "image", f"out_{name}", "value")]
    return nodes, edges


# Unique to this run: the node cache is content-addressed and outlives a test, so another test (or
# an earlier run against the same app) drawing the same kite would make the "first" run a cache hit.
KITE = f"a red kite {uuid.uuid4().hex[:8]}"


def diamond(seed_a: int = 1, seed_b: int = 2) -> dict:
    a_nodes, a_edges = branch("a", seed_a)
    b_nodes, b_edges = branch("b", seed_b)
    return {"name": "diamond", "nodes": [node("prompt", "prompt", text=KITE), *a_nodes, *b_nodes],
            "edges": a_edges + b_edges}


def run(client, workflow: dict | None = None, **fields) -> dict:
    response = client.post("/v1/workflows/runs", json={"workflow": workflow, **fields} if workflow else fields)
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["id"], timeout_s=240)


def output_bytes(client, job: dict) -> list[bytes]:
    return [httpx.get(o["url"]).content for o in job["outputs"]]


def invalid(response: httpx.Response) -> set[tuple]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"]
    return {(e["node"], e["field"]) for e in error["errors"]}


def test_text_image_upscale_video_runs_as_one_job_with_node_progress(client):
    workflow = {
        "nodes": [node("idea", "prompt", text="a lighthouse"), node("still", "text_to_image", size="32x32", steps=2),
                  node("pick", "select"), node("big", "upscale", steps=2),
                  node("clip", "image_to_video", num_frames=3, fps=6, steps=2, size="64x64"),
                  node("video", "output"), node("frame", "output")],
        "edges": [edge("idea", "text", "still", "prompt"), edge("still", "images", "pick", "images"),
                  edge("pick", "image", "big", "image"), edge("big", "image", "clip", "image"),
                  edge("clip", "video", "video", "value"), edge("pick", "image", "frame", "value")],
    }
    response = client.post("/v1/workflows/runs", json={"workflow": workflow})
    assert response.status_code == 202, response.text
    events = read_events(client, response.json()["id"], timeout_s=240)
    job = events[-1]
    assert job["status"] == "completed", job
    nodes = job["result"]["nodes"]
    assert all(n["status"] == "completed" and n["progress"] == 100 for n in nodes.values()), nodes
    for before, after in [("still", "big"), ("big", "clip")]:
        assert nodes[before]["finished_at"] <= nodes[after]["started_at"]
    # every model node streamed its denoising steps into its state on the job (2 steps each)...
    model_nodes = ("still", "big", "clip")
    assert all(nodes[n]["progress_updates"] >= 2 for n in model_nodes), {n: nodes[n] for n in model_nodes}
    # ...and progress showed up in the job's events while a node ran
    running = {(name, n["progress"]) for e in events for name, n in ((e.get("result") or {}).get("nodes") or {}).items()
               if n["status"] == "running"}
    assert any(0 < progress < 100 for _, progress in running), running
    assert [o["content_type"] for o in job["outputs"]] == ["video/mp4", "image/png"]
    video, frame = job["outputs"]
    frames = iio.imread(io.BytesIO(httpx.get(video["url"]).content), index=None, extension=".mp4")
    assert frames.shape[:3] == (3, 64, 64)

    # The ingress pinned a seed on every node whose type takes one; the recorded run holds them.
    schema = client.get("/v1/workflows/schema").json()["node_types"]
    seeded = {t for t, spec in schema.items() if "seed" in spec["params"]["properties"]}
    recorded = {n["id"]: n for n in job["params"]["workflow"]["nodes"]}
    seeds = {n["id"]: n["params"].get("seed") for n in recorded.values() if n["type"] in seeded}
    assert set(seeds) == set(model_nodes) and all(isinstance(seed, int) for seed in seeds.values()), seeds

    # Lineage on each output: the job, the seeds, and the model each node ran on.
    models = job["result"]["models"]
    assert set(models) == {"sdxl", "upscaler", "svd"} and all(isinstance(m, str) and m for m in models.values())
    lineage = video["extra"]["lineage"]
    assert lineage["job_id"] == job["id"] and [n["id"] for n in lineage["nodes"]][-1] == "video"
    assert lineage["seeds"] == seeds
    by_id = {n["id"]: n for n in lineage["nodes"]}
    assert {n: by_id[n]["model_id"] for n in model_nodes} == {"still": models["sdxl"], "big": models["upscaler"],
                                                               "clip": models["svd"]}
    assert frame["extra"]["lineage"]["seeds"] == {"still": seeds["still"]}
    # The SDXL image's PNG text chunks carry its lineage, but not the job id (a replay is another
    # job and must write the same bytes): that stays in the output's metadata above.
    chunks = Image.open(io.BytesIO(httpx.get(frame["url"]).content)).text
    assert chunks["seed"] == str(seeds["still"]) and chunks["model_id"] == models["sdxl"]
    assert chunks["prompt"] == "a lighthouse" and chunks["steps"] == "2" and chunks["mode"] == "text_to_image"
    assert job["id"] not in json.dumps(chunks)


def test_diamond_runs_branches_concurrently_then_from_cache_and_replays(client):
    first = run(client, diamond())
    assert first["status"] == "completed", first
    nodes = first["result"]["nodes"]
    a, b = nodes["t2i_a"], nodes["t2i_b"]
    assert max(a["started_at"], b["started_at"]) < min(a["finished_at"], b["finished_at"]), (a, b)  # overlapping
    assert [o["extra"]["name"] for o in first["outputs"]] == ["a", "b"]
    assert all(o["width"] is None or o["width"] == 128 for o in first["outputs"])
    images = output_bytes(client, first)
    assert images[0] != images[1]

    again = run(client, diamond())
    assert set(again["result"]["cached"]) == {"t2i_a", "up_a", "t2i_b", "up_b"}
    assert output_bytes(client, again) == images

    changed = run(client, diamond(seed_b=3))
    assert set(changed["result"]["cached"]) == {"t2i_a", "up_a"}  # only branch b recomputed
    assert changed["result"]["nodes"]["t2i_b"]["status"] == "completed"
    changed_images = output_bytes(client, changed)
    assert changed_images[0] == images[0] and changed_images[1] != images[1]

    no_cache = run(client, diamond(), use_cache=False)
    assert no_cache["result"]["cached"] == [] and output_bytes(client, no_cache) == images  # same seeds, same bytes

    replay = client.post(f"/v1/jobs/{first['id']}/replay")
    assert replay.status_code == 202, replay.text
    replayed = wait_for_job(client, replay.json()["id"], timeout_s=240)
    assert replayed["status"] == "completed" and replayed["result"]["cached"] == []
    assert output_bytes(client, replayed) == images


def test_replay_of_an_image_job_with_a_random_seed_reproduces_its_bytes(client):
    response = client.post("/v1/images/generations", params={"async": "true"},
                           json={"prompt": "a pear", "size": "64x64", "steps": 2, "n": 2})
    original = wait_for_job(client, response.json()["id"])
    replay = client.post(f"/v1/jobs/{original['id']}/replay")
    assert replay.status_code == 202, replay.text
    replayed = wait_for_job(client, replay.json()["id"])
    assert replayed["status"] == "completed"
    assert output_bytes(client, replayed) == output_bytes(client, original)


def test_failed_node_fails_its_dependants_and_the_other_branch_finishes(client):
    workflow = diamond()
    workflow["nodes"][2]["params"]["index"] = 5  # pick_a: there is only one image
    job = run(client, workflow)
    assert job["status"] == "failed" and "pick_a" in job["error"]["message"], job
    nodes = job["result"]["nodes"]
    assert nodes["pick_a"]["status"] == "failed" and "index" in nodes["pick_a"]["error"]
    assert nodes["up_a"]["status"] == "failed" and nodes["up_a"]["error"].startswith("upstream node pick_a")
    assert nodes["out_b"]["status"] == "completed" and [o["extra"]["name"] for o in job["outputs"]] == ["b"]


def test_cancel_mid_run(client):
    workflow = {"nodes": [node("p", "prompt", text="slow"), node("t", "text_to_image", size="64x64", steps=50, n=8),
                          node("s", "select"), node("u", "upscale"), node("o", "output")],
                "edges": [edge("p", "text", "t", "prompt"), edge("t", "images", "s", "images"),
                          edge("s", "image", "u", "image"), edge("u", "image", "o", "value")]}
    job = client.post("/v1/workflows/runs", json={"workflow": workflow, "use_cache": False}).json()
    deadline = time.monotonic() + 120
    while (client.get(f"/v1/jobs/{job['id']}").json().get("result") or {}).get("nodes", {}).get("t", {}).get(
            "progress", 0) <= 0:
        assert time.monotonic() < deadline, "t never started"
        time.sleep(0.2)
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    final = wait_for_job(client, job["id"])
    assert final["status"] == "cancelled", final
    nodes = final["result"]["nodes"]
    assert nodes["t"]["status"] == "cancelled" and nodes["t"]["progress"] < 100
    assert nodes["u"]["status"] == "cancelled" and nodes["u"]["started_at"] is None  # never ran


def test_saved_workflow_versions_and_runs_by_reference(client):
    created = client.post("/v1/workflows", json={"name": "kites", "description": "two kites", "workflow": diamond()})
    assert created.status_code == 201, created.text
    saved = created.json()
    assert saved["version"] == 1 and saved["id"].startswith("wf")
    updated = client.put(f"/v1/workflows/{saved['id']}",
                         json={"name": "kites", "description": "seed 9", "workflow": diamond(seed_a=9)})
    assert updated.status_code == 200 and updated.json()["version"] == 2
    assert client.get(f"/v1/workflows/{saved['id']}", params={"version": 1}).json()["description"] == "two kites"
    assert saved["id"] in [w["id"] for w in client.get("/v1/workflows").json()["data"]]

    job = run(client, workflow_id=saved["id"], version=1)
    assert job["status"] == "completed" and job["result"]["workflow"]["version"] == 1
    assert job["outputs"][0]["extra"]["lineage"]["workflow"] == {"id": saved["id"], "version": 1, "name": "kites"}
    assert client.delete(f"/v1/workflows/{saved['id']}").status_code == 200
    assert client.get(f"/v1/workflows/{saved['id']}").status_code == 404


def test_validation_lists_every_problem(client):
    schema = client.get("/v1/workflows/schema").json()
    assert {"text_to_image", "upscale", "image_to_video", "refine", "select", "output"} <= set(schema["node_types"])

    bad = {
        "nodes": [node("p", "prompt", text="x"), node("t", "text_to_image", steps=2), node("v", "image_to_video"),
                  node("q", "teleport"), node("empty", "prompt"), node("c1", "upscale"), node("c2", "upscale"),
                  node("o", "output")],
        "edges": [edge("p", "text", "t", "prompt"), edge("t", "images", "v", "image"),  # images into an image port
                  edge("c1", "image", "c2", "image"), edge("c2", "image", "c1", "image"),  # a cycle
                  edge("v", "video", "o", "value")],
    }
    problems = invalid(client.post("/v1/workflows/runs", json={"workflow": bad}))
    assert {("v", "inputs.image"), ("q", "type"), ("empty", "params.text")} <= problems, problems
    assert any(node_id in ("c1", "c2") and field is None for node_id, field in problems), problems  # the cycle

    report = client.post("/v1/workflows/validate", json=bad).json()
    assert report["valid"] is False and len(report["errors"]) >= 4
    cycle = next(e for e in report["errors"] if "cycle" in e["message"])
    assert "c1" in cycle["message"] and "c2" in cycle["message"]

    huge = {"nodes": [node(f"n{i}", "prompt", text="x") for i in range(500)], "edges": []}
    assert invalid(client.post("/v1/workflows/runs", json={"workflow": huge})) == {(None, "nodes")}

    malformed = client.post("/v1/workflows/runs", content=b'{"workflow": {"nodes": [', headers={
        "content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "body"

    good = diamond()
    report = client.post("/v1/workflows/validate", json=good).json()
    assert report["valid"] and report["order"].index("t2i_a") < report["order"].index("up_a")
    unknown_style = json.loads(json.dumps(good))
    unknown_style["nodes"][1]["params"]["style"] = "baroque-nonexistent"
    assert ("t2i_a", "params.style") in invalid(client.post("/v1/workflows/runs", json={"workflow": unknown_style}))
