"""What the web UI's workflow editor relies on from the server (issue 21): the node catalogue
(`GET /v1/workflows/schema`), the templates (`GET /v1/workflows/templates`), and the `ui` layout
block that is saved with a workflow and ignored by the engine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from api.ingress import create_app
from api.workflows.service import WorkflowsService
from api.workflows.templates import TEMPLATES
from graphs.workflows import (NODE_TYPES, InMemoryWorkflowCache, Workflow, cache_key, run_workflow,
                              validate_workflow)
from storage.fs import Storage
from storage.workflows import SavedWorkflowStore

LOCAL = "http://127.0.0.1:8000"
LAYOUT = {"positions": {"idea": {"x": 10, "y": 20}, "out": {"x": 400.5, "y": -30}},
          "groups": [{"id": "g1", "title": "inputs", "x": 0, "y": 0, "width": 300, "height": 200, "nodes": ["idea"]}],
          "comments": [{"id": "c1", "text": "try a warmer prompt", "x": 50, "y": 250}],
          "viewport": {"x": 0, "y": 0, "zoom": 1.25}}


def prompt_to_output(**extra) -> dict:
    return {"name": "kite", "nodes": [{"id": "idea", "type": "prompt", "params": {"text": "a kite"}},
                                      {"id": "out", "type": "output", "params": {}}],
            "edges": [{"source": "idea", "source_port": "text", "target": "out", "target_port": "value"}], **extra}


@pytest.fixture()
def client(tmp_path):
    storage = Storage(str(tmp_path / "storage"))
    models = SimpleNamespace(handles={"sdxl": object(), "upscaler": object()}, limits={})  # no svd, no llm
    service = WorkflowsService(SavedWorkflowStore(storage), storage, jobs=None, models=models, text=None, max_nodes=100)
    with TestClient(create_app(SimpleNamespace(workflows=service)), base_url=LOCAL) as http:
        yield http


# --- the node catalogue ------------------------------------------------------------------------------


def test_the_schema_lists_every_node_type_with_typed_ports_and_param_schemas(client):
    response = client.get("/v1/workflows/schema")
    assert response.status_code == 200
    schema = response.json()
    assert set(schema["node_types"]) == set(NODE_TYPES)
    assert set(schema["port_types"]) == {"text", "image", "images", "video", "mask", "scores", "any"}
    t2i = schema["node_types"]["text_to_image"]
    assert t2i["inputs"] == {"prompt": {"type": "text", "required": True},
                             "negative_prompt": {"type": "text", "required": False}}
    assert t2i["outputs"] == {"images": "images"} and t2i["deployment"] == "sdxl"
    params = t2i["params"]["properties"]
    assert params["n"]["enum"] == [1, 2, 4, 8]  # a select in the editor
    assert params["lora_scale"]["minimum"] == 0 and params["lora_scale"]["maximum"] == 4  # a bounded number
    seed = next(s for s in params["seed"]["anyOf"] if s.get("type") == "integer")
    assert seed["minimum"] == 0 and seed["maximum"] == 2**32 - 1
    assert schema["node_types"]["prompt"]["params"]["required"] == ["text"]
    assert schema["node_types"]["output"]["inputs"]["value"]["type"] == "any"
    assert all(set(t) >= {"description", "inputs", "outputs", "params"} for t in schema["node_types"].values())
    # the workflow document itself documents the ui block
    assert "ui" in schema["workflow"]["properties"]


def test_a_node_type_added_on_the_server_appears_in_the_catalogue(client, monkeypatch):
    monkeypatch.setitem(NODE_TYPES, "shout", NODE_TYPES["prompt"].model_copy(update={"description": "LOUD"}))
    assert client.get("/v1/workflows/schema").json()["node_types"]["shout"]["description"] == "LOUD"


def test_templates_are_valid_workflows_and_say_what_they_need(client):
    response = client.get("/v1/workflows/templates")
    assert response.status_code == 200
    templates = {t["id"]: t for t in response.json()["data"]}
    assert set(templates) >= {"text_to_image", "text_image_video", "diamond"}
    for template in templates.values():
        report = validate_workflow(template["workflow"])
        assert report.valid, (template["id"], report.errors)
        assert "ui" not in template["workflow"]  # laid out by the editor
    assert [n["type"] for n in templates["text_to_image"]["workflow"]["nodes"]] == ["prompt", "text_to_image", "output"]
    chain = {n["type"] for n in templates["text_image_video"]["workflow"]["nodes"]}
    assert {"prompt", "text_to_image", "image_to_video", "upscale", "output"} <= chain
    diamond = templates["diamond"]["workflow"]
    prompt_users = [e["target"] for e in diamond["edges"] if e["source"] == "prompt"]
    assert len(prompt_users) == 2  # one source, two branches
    # this app deploys sdxl and the upscaler, not svd
    assert templates["text_to_image"] == {**templates["text_to_image"], "requires": ["sdxl"], "available": True}
    assert templates["text_image_video"]["requires"] == ["sdxl", "svd", "upscaler"]
    assert templates["text_image_video"]["available"] is False
    assert templates["diamond"]["available"] is True
    assert TEMPLATES["diamond"]["workflow"] == diamond


# --- the ui block ---------------------------------------------------------------------------------------


def test_the_ui_block_is_in_no_check():
    plain = validate_workflow(prompt_to_output())
    odd_layout = {"positions": {"nobody": "here", "idea": [1, 2]}, "groups": "not a list", "whatever": {"x": None}}
    with_ui = validate_workflow(prompt_to_output(ui=odd_layout))
    assert plain.valid and with_ui.valid
    assert with_ui.order == plain.order == ["idea", "out"]
    # the only rule: it is a JSON object, when given
    report = validate_workflow(prompt_to_output(ui=["x"]))
    assert not report.valid and [e.field for e in report.errors] == ["ui"]


def test_the_ui_block_is_in_no_cache_key():
    def images(ctx):
        return {"images": [f"outputs/{ctx.params.seed}.png"]}

    def workflow(ui):
        doc = {"nodes": [{"id": "p", "type": "prompt", "params": {"text": "a pear"}},
                         {"id": "t", "type": "text_to_image", "params": {"seed": 5}},
                         {"id": "o", "type": "output", "params": {}}],
               "edges": [{"source": "p", "source_port": "text", "target": "t", "target_port": "prompt"},
                         {"source": "t", "source_port": "images", "target": "o", "target_port": "value"}]}
        return Workflow.model_validate({**doc, "ui": ui} if ui is not None else doc)

    cache = InMemoryWorkflowCache()
    first = run_workflow(workflow(None), {"text_to_image": images}, cache=cache)
    moved = run_workflow(workflow(copy.deepcopy(LAYOUT)), {"text_to_image": images}, cache=cache)
    assert first.nodes["t"].status == "completed" and moved.nodes["t"].status == "cached"
    assert moved.nodes["t"].cache_key == first.nodes["t"].cache_key
    node = workflow(LAYOUT).nodes[1]
    assert cache_key(node, {"prompt": "a pear"}) == cache_key(workflow(None).nodes[1], {"prompt": "a pear"})


def test_a_saved_workflow_keeps_its_layout_and_one_without_still_loads(client):
    created = client.post("/v1/workflows", json={"name": "laid out", "workflow": prompt_to_output(ui=LAYOUT)})
    assert created.status_code == 201, created.text
    saved = created.json()
    assert saved["workflow"]["ui"] == LAYOUT
    again = client.get(f"/v1/workflows/{saved['id']}").json()
    assert again["workflow"]["ui"] == LAYOUT
    # a new version with the nodes moved: the layout is per version
    moved = copy.deepcopy(LAYOUT)
    moved["positions"]["idea"] = {"x": 999, "y": 1}
    put = client.put(f"/v1/workflows/{saved['id']}", json={"name": "laid out", "workflow": prompt_to_output(ui=moved)})
    assert put.status_code == 200 and put.json()["version"] == 2
    assert client.get(f"/v1/workflows/{saved['id']}", params={"version": 1}).json()["workflow"]["ui"] == LAYOUT
    assert client.get(f"/v1/workflows/{saved['id']}").json()["workflow"]["ui"]["positions"]["idea"] == {"x": 999, "y": 1}

    bare = client.post("/v1/workflows", json={"name": "bare", "workflow": prompt_to_output()})
    assert bare.status_code == 201, bare.text
    loaded = client.get(f"/v1/workflows/{bare.json()['id']}").json()["workflow"]
    assert loaded.get("ui") is None and [n["id"] for n in loaded["nodes"]] == ["idea", "out"]
    assert client.post("/v1/workflows/validate", json=loaded).json()["valid"] is True


def test_validation_through_the_api_ignores_the_layout(client):
    report = client.post("/v1/workflows/validate", json=prompt_to_output(ui=LAYOUT)).json()
    assert report == {"valid": True, "errors": [], "order": ["idea", "out"]}
    broken = prompt_to_output(ui=LAYOUT)
    broken["nodes"][0]["params"] = {"text": ""}
    report = client.post("/v1/workflows/validate", json=broken).json()
    assert not report["valid"] and [(e["node"], e["field"]) for e in report["errors"]] == [("idea", "params.text")]
