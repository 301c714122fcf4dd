"""Issue 22, item 1: LoRAs on /v1/images/edits and on the workflow's image_to_image and inpaint
nodes (a `lora` sent there used to be dropped by the edits form and refused by those nodes'
params): accepted, checked against the registry (unknown: a 400 naming the field), pinned to a
version in the job, applied by the deployment (the image differs from the same request without
it, under a fixed seed) and recorded in the lineage."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from api.auth import Caller, acting_as, reset_caller
from deployments.sdxl.contract import SDXLRequest
from graphs.payloads import WorkflowRunPayload
from graphs.workflow_jobs import _lineage, node_runners
from graphs.workflows import NODE_TYPES, Node, NodeContext
from storage.keys import output_key
from storage.registry import LoraManifest
from tests.keyed_app import keyed_app, png, safetensors_bytes

REPO = Path(__file__).resolve().parents[2]
KEYS = {"ann": ("ann-key", ["generate", "train"]), "ben": ("ben-key", ["generate", "train"])}
WEIGHTS = safetensors_bytes(["unet.down_blocks.0.attn1.to_q.lora.down.weight"])


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


def mask_png(width: int = 64, height: int = 64) -> bytes:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))  # the left half is repainted
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def app(tmp_path):
    built = keyed_app(tmp_path, KEYS)
    registry = built.services.models.loras
    built.ink = registry.register("ink", LoraManifest(base_model="m", rank=2, trigger_word="inky"), WEIGHTS,
                                  owner="ann")
    registry.register("bens", LoraManifest(base_model="m", rank=2), WEIGHTS, owner="ben")
    return built


def edit(app, who: str = "ann", mask: bool = False, **fields):
    files = {"image": ("a.png", png(), "image/png")}
    if mask:
        files["mask"] = ("m.png", mask_png(), "image/png")
    return app.client.post("/v1/images/edits?async=true", headers=bearer(who), files=files,
                           data={"prompt": "a boat", "seed": "3", **fields})


def error_param(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["param"]


# --- /v1/images/edits ---------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [False, True], ids=["image_to_image", "inpaint"])
def test_an_edit_takes_a_registered_lora_pinned_to_its_version(app, mask):
    response = edit(app, mask=mask, lora="ink", lora_scale="0.5")
    assert response.status_code == 202, response.text
    job = response.json()
    sdxl = app.services.jobs.jobs.get(job["id"]).request["sdxl"]  # what the job runs
    assert sdxl["mode"] == ("inpaint" if mask else "image_to_image")
    assert (sdxl["lora"], sdxl["lora_scale"]) == ("ink:1", 0.5)
    assert job["params"]["sdxl"]["lora"] == "ink:1"  # the job's lineage, as GET /v1/jobs/{id} shows it


def test_an_edit_without_a_lora_runs_the_base_model(app):
    for fields in ({}, {"lora": ""}):  # a form's empty field is no LoRA
        response = edit(app, **fields)
        assert response.status_code == 202, response.text
        sdxl = app.services.jobs.jobs.get(response.json()["id"]).request["sdxl"]
        assert sdxl["lora"] is None and sdxl["lora_scale"] == 1.0


def test_a_bad_lora_on_an_edit_is_a_4xx_naming_the_field(app):
    unknown = edit(app, lora="nope")
    assert error_param(unknown, 404) == "lora" and "nope" in unknown.json()["error"]["message"]
    assert error_param(edit(app, lora="ink:7"), 404) == "lora"  # no such version
    assert error_param(edit(app, mask=True, lora="bens"), 404) == "lora"  # ben's: as unknown to ann
    assert error_param(edit(app, lora="ink", lora_scale="5")) == "lora_scale"
    assert error_param(edit(app, lora="ink", lora_scale="much")) == "lora_scale"
    assert app.queue.sent == []  # nothing was enqueued


# --- workflow image_to_image and inpaint nodes --------------------------------------------------


def edit_workflow(image: str, mask: str, lora: str | None) -> dict:
    lora_params = {"lora": lora, "lora_scale": 0.7} if lora else {}
    return {
        "nodes": [{"id": "img", "type": "image", "params": {"key": image}},
                  {"id": "msk", "type": "mask", "params": {"key": mask}},
                  {"id": "p", "type": "prompt", "params": {"text": "a boat"}},
                  {"id": "redraw", "type": "image_to_image", "params": {"steps": 2, **lora_params}},
                  {"id": "repaint", "type": "inpaint", "params": {"steps": 2, **lora_params}},
                  {"id": "out1", "type": "output", "params": {}},
                  {"id": "out2", "type": "output", "params": {}}],
        "edges": [{"source": "img", "source_port": "image", "target": "redraw", "target_port": "image"},
                  {"source": "p", "source_port": "text", "target": "redraw", "target_port": "prompt"},
                  {"source": "img", "source_port": "image", "target": "repaint", "target_port": "image"},
                  {"source": "msk", "source_port": "mask", "target": "repaint", "target_port": "mask"},
                  {"source": "p", "source_port": "text", "target": "repaint", "target_port": "prompt"},
                  {"source": "redraw", "source_port": "images", "target": "out1", "target_port": "value"},
                  {"source": "repaint", "source_port": "images", "target": "out2", "target_port": "value"}]}


@pytest.fixture()
def stored(app) -> tuple[str, str]:
    """An image and a mask stored as ann's outputs."""
    token = acting_as(Caller(owner="ann"))
    try:
        storage, files = app.services.images.storage, app.services.files
        return (storage.put_bytes(output_key(files.output_id(), 0), png(seed=1)),
                storage.put_bytes(output_key(files.output_id(), 0), mask_png()))
    finally:
        reset_caller(token)


def test_the_edit_nodes_have_lora_params():
    for node_type in ("image_to_image", "inpaint"):
        params = NODE_TYPES[node_type].params(lora="ink:1", lora_scale=0.25)
        assert (params.lora, params.lora_scale) == ("ink:1", 0.25)


def test_an_unknown_lora_on_an_edit_node_names_the_node_and_field(app, stored):
    response = app.client.post("/v1/workflows/validate", headers=bearer("ann"),
                               json=edit_workflow(*stored, lora="nope"))
    report = response.json()
    assert report["valid"] is False
    assert {(e["node"], e["field"]) for e in report["errors"]} == {("redraw", "params.lora"),
                                                                    ("repaint", "params.lora")}
    run = app.client.post("/v1/workflows/runs", headers=bearer("ann"),
                          json={"workflow": edit_workflow(*stored, lora="bens")})  # ben's
    assert run.status_code == 400, run.text
    assert "params.lora" in run.text


def test_a_workflow_run_pins_the_edit_nodes_lora_and_its_lineage_records_it(app, stored):
    workflow = edit_workflow(*stored, lora="ink")
    assert app.client.post("/v1/workflows/validate", headers=bearer("ann"), json=workflow).json()["valid"] is True
    run = app.client.post("/v1/workflows/runs", headers=bearer("ann"), json={"workflow": workflow})
    assert run.status_code == 202, run.text
    spec = WorkflowRunPayload.model_validate(app.services.jobs.jobs.get(run.json()["id"]).request)
    nodes = {node.id: node.params for node in spec.workflow.nodes}
    assert nodes["redraw"]["lora"] == nodes["repaint"]["lora"] == "ink:1"  # pinned to the version
    assert spec.loras["ink:1"].sha256 == app.ink.sha256 and app.ink.sha256
    for output, node in (("out1", "redraw"), ("out2", "repaint")):
        lineage = _lineage(spec.workflow, output, spec, "job_x", {})
        entry = next(n for n in lineage["nodes"] if n["id"] == node)
        assert entry["lora"] == {"name": "ink", "version": 1, "sha256": app.ink.sha256}
        assert entry["params"]["lora_scale"] == 0.7


class RecordingSDXL:
    """A stand-in SDXL handle: records the multiplexed model id and the request of each call."""

    def __init__(self):
        self.calls: list[tuple[str | None, SDXLRequest]] = []
        self._model_id = None

    def options(self, multiplexed_model_id: str | None = None, **_):
        self._model_id = multiplexed_model_id or self._model_id
        return self

    @property
    def generate_stream(self):
        return SimpleNamespace(remote=self._remote)

    def _remote(self, request: SDXLRequest):
        self.calls.append((self._model_id, request))
        self._model_id = None
        return _Stream([SimpleNamespace(images=[SimpleNamespace(key="outputs/made.png")])])


class _Stream(list):
    """A streamed call's events (the response last), as drain_stream reads them."""

    def cancel(self):
        pass


@pytest.mark.parametrize("node_type", ["image_to_image", "inpaint"])
def test_the_edit_node_runner_sends_the_lora_routed_to_it(node_type):
    sdxl = RecordingSDXL()
    spec = WorkflowRunPayload.model_validate({"workflow": {"nodes": [], "edges": []}})
    runner = node_runners({"sdxl": sdxl}, "job_x", spec)[node_type]
    params = NODE_TYPES[node_type].params(lora="ink:1", lora_scale=0.3, seed=5, steps=2)
    inputs = {"prompt": "a boat", "image": "outputs/in.png", **({"mask": "outputs/m.png"} if node_type == "inpaint"
                                                                 else {})}
    node = NodeContext(Node(id="n", type=node_type, params=params.model_dump()), params, inputs,
                       progress=lambda fraction: None, check_cancelled=lambda: None)
    assert runner(node) == {"images": ["outputs/made.png"]}
    (model_id, request), = sdxl.calls
    assert model_id == "ink:1" and (request.mode, request.lora, request.lora_scale) == (node_type, "ink:1", 0.3)


# --- the deployment applies it in both edit modes --------------------------------------------


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from deployments.sdxl.deployment import SDXLDeployment
    from local.tiny_models import build_random_lora, ensure_tiny_models
    from storage import Storage
    from storage.registry import LoraRegistry

    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    root = tmp_path_factory.mktemp("storage")
    LoraRegistry(Storage(str(root))).register(
        "ink", {"base_model": str(model), "rank": 4}, build_random_lora(model, tmp_path_factory.mktemp("ink"), 4))
    sdxl = SDXLDeployment.func_or_class({
        "model": str(model), "storage_root": str(root), "default_size": 64, "min_size": 32, "max_size": 256,
        "default_steps": 2, "max_steps": 50, "torch_num_threads": 2, "batch_wait_timeout_s": 0.05})
    with asyncio.Runner() as runner:
        yield runner.run, sdxl


def pixels(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.images[0].png))).astype(np.int16)


@pytest.mark.parametrize("mode", ["image_to_image", "inpaint"])
def test_a_lora_changes_an_edit_and_is_recorded_in_the_png(deployment, mode):
    run, sdxl = deployment
    request = dict(mode=mode, prompt="a boat", seed=3, steps=2, image=png(seed=2),
                   mask=mask_png() if mode == "inpaint" else None)
    base = run(sdxl.generate(SDXLRequest(**request)))
    with_lora = run(sdxl.generate(SDXLRequest(**request, lora="ink", lora_scale=1.0)))
    assert base.lora is None and with_lora.lora == "ink:1" and with_lora.lora_sha256
    assert np.abs(pixels(base) - pixels(with_lora)).mean() > 1.0
    text = Image.open(io.BytesIO(with_lora.images[0].png)).text
    assert (text["mode"], text["lora"], text["lora_sha256"]) == (mode, "ink:1", with_lora.lora_sha256)
