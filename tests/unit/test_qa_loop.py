"""The QA loop (issue 19, item 5) and the judge node: generate → judge → refine the prompt with the
judge's reasons → generate again, until the score reaches the threshold or the rounds run out.

No Ray and no models: SDXL is a fake handle (tests/unit/test_best_of.py's, a grey level per seed),
the judge returns a fixed score per round, and the LLM answers each refine chat with a prompt
that says which round asked. The loop runs as the job runs it (graphs/workflow_jobs.workflow_run
over a real JobStore), so what it records is what the job record holds.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from api.workflows.templates import TEMPLATES, list_templates
from deployments.llm.vision import Judgement
from graphs import vision as graph_vision
from graphs.job_runner import JobContext
from graphs.payloads import WorkflowRunPayload
from graphs.workflow_jobs import workflow_run
from graphs.workflows import NODE_TYPES, validate_workflow
from storage.fs import Storage
from storage.jobs import JobStore
from tests.unit.test_best_of import SEED, FakeSDXL, FakeStream, build, level_of

PROMPT = "a ceramic mug on a marble counter"


class RoundJudge:
    """Scores by the image's round (its grey level: seed offset = round), with reasons naming it."""

    def __init__(self, scores: list[int]) -> None:
        self.scores = scores
        self.calls: list[dict] = []

    def __call__(self, handle, images, prompt, model_id, settings, criteria=None):
        self.calls.append({"prompt": prompt, "criteria": criteria, "model": model_id})
        out = []
        for png in images:
            r = level_of(png)
            out.append(Judgement(score=self.scores[r], reasons=[f"round {r + 1} is too dark"],
                                 defects=[f"blur {r + 1}"], matches_prompt=self.scores[r] >= 5))
        return out


class FakeLLM:
    """The LLM deployment's chat: a refined prompt that names the round it was asked in."""

    def __init__(self) -> None:
        self.chats: list[Any] = []
        self.lock = threading.Lock()

    def options(self, **_: Any) -> "FakeLLM":
        return self

    @property
    def chat(self) -> SimpleNamespace:
        def remote(request, _raw=None):
            with self.lock:
                self.chats.append(request)
                count = len(self.chats)
            content = json.dumps({"prompt": f"{PROMPT}, brighter (rewrite {count})", "negative_prompt": "dark"})
            message = SimpleNamespace(content=content)
            return FakeStream([SimpleNamespace(model="gemma", choices=[
                SimpleNamespace(message=message, finish_reason="stop")])])

        return SimpleNamespace(remote=remote)


class FakeDescribe:
    def __init__(self, info: dict) -> None:
        self.info = info

    @property
    def describe(self) -> SimpleNamespace:
        return SimpleNamespace(remote=lambda: SimpleNamespace(result=lambda timeout_s=None: self.info))


class DescribedSDXL(FakeSDXL, FakeDescribe):
    def __init__(self) -> None:
        FakeSDXL.__init__(self)
        FakeDescribe.__init__(self, {"model": "sdxl", "source": "models/tiny/sdxl"})


def qa_workflow(**params: Any) -> dict:
    return {
        "nodes": [{"id": "p", "type": "prompt", "params": {"text": PROMPT}},
                  {"id": "qa", "type": "qa_loop", "params": {"seed": SEED, "size": "64x64", "steps": 2, **params}},
                  {"id": "still", "type": "output", "params": {"name": "still"}},
                  {"id": "rounds", "type": "output", "params": {"name": "rounds"}}],
        "edges": [{"source": "p", "source_port": "text", "target": "qa", "target_port": "prompt"},
                  {"source": "qa", "source_port": "image", "target": "still", "target_port": "value"},
                  {"source": "qa", "source_port": "rounds", "target": "rounds", "target_port": "value"}],
    }


def run_qa(tmp_path, monkeypatch, scores: list[int], **params: Any) -> SimpleNamespace:
    judge = RoundJudge(scores)
    monkeypatch.setattr(graph_vision, "judge_images", judge)
    payload = WorkflowRunPayload.create(
        workflow=qa_workflow(**params), use_cache=False,
        refine={"qa": {"model": "gemma", "source": "models/tiny/gemma"}},
        judge={"model": "gemma", "source": "models/tiny/gemma"}, loras={}, saved=None)
    store = JobStore(Storage(str(tmp_path / "root")))
    ctx = JobContext(store, store.create("workflows.run", payload.to_request(), stages=["workflow"]))
    sdxl, llm = DescribedSDXL(), FakeLLM()
    workflow_run(ctx, {"sdxl": sdxl, "llm": llm})
    saved = store.get(ctx.id)  # what the job record holds
    return SimpleNamespace(record=saved, ctx=ctx, sdxl=sdxl, llm=llm, judge=judge, storage=store.storage)


def test_the_loop_stops_once_the_score_reaches_the_threshold_and_records_each_round(tmp_path, monkeypatch):
    run = run_qa(tmp_path, monkeypatch, [4, 6, 8, 9, 10], threshold=7, max_rounds=5, criteria="no text")
    qa = run.record.result["nodes"]["qa"]
    rounds = qa["info"]["rounds"]
    assert [r["score"] for r in rounds] == [4, 6, 8]  # round 3 reached 7: no round 4
    assert qa["info"]["stopped"] == "threshold" and qa["info"]["best_round"] == 3
    assert [r["seed"] for r in rounds] == [SEED, SEED + 1, SEED + 2]  # round r: seed + r
    assert [q.seed for q in run.sdxl.requests] == [SEED, SEED + 1, SEED + 2]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    # round 1 runs the prompt as given, each later round the LLM's rewrite
    assert [r["prompt"] for r in rounds] == [PROMPT, f"{PROMPT}, brighter (rewrite 1)", f"{PROMPT}, brighter (rewrite 2)"]
    assert [q.prompt for q in run.sdxl.requests] == [r["prompt"] for r in rounds]
    assert rounds[1]["negative_prompt"] == "dark" and rounds[1]["refined"] is True
    assert rounds[0]["reasons"] == ["round 1 is too dark"] and rounds[0]["defects"] == ["blur 1"]
    # every round is judged against the prompt asked for, with the criteria
    assert [c["prompt"] for c in run.judge.calls] == [PROMPT] * 3
    assert {c["criteria"] for c in run.judge.calls} == {"no text"}
    # the refine chat carries the judge's reasons and defects of the round before
    asks = [str(chat.messages[-1]) for chat in run.llm.chats]
    assert len(asks) == 2
    assert "round 1 is too dark" in asks[0] and "blur 1" in asks[0] and "scored 4/10" in asks[0]
    assert "round 2 is too dark" in asks[1] and f"Request: {PROMPT}, brighter (rewrite 1)" in asks[1]
    # each round's image is stored; the output is the best round's
    assert [level_of(run.storage.get_bytes(r["image"])) for r in rounds] == [0, 1, 2]
    assert run.record.result["outputs"]["still"] == rounds[2]["image"]
    assert run.record.result["outputs"]["rounds"] == rounds
    assert [o.key for o in run.record.outputs] == [rounds[2]["image"]]
    assert run.record.status != "failed"


def test_the_loop_stops_after_max_rounds_and_keeps_the_best_round(tmp_path, monkeypatch):
    run = run_qa(tmp_path, monkeypatch, [2, 5, 3, 9], threshold=9, max_rounds=3)
    info = run.record.result["nodes"]["qa"]["info"]
    assert [r["score"] for r in info["rounds"]] == [2, 5, 3]  # never 9: three rounds, no more
    assert info["stopped"] == "max_rounds" and info["best_round"] == 2
    assert len(run.sdxl.requests) == 3 and len(run.llm.chats) == 2  # no rewrite after the last round
    assert run.record.result["outputs"]["still"] == info["rounds"][1]["image"]


def test_the_first_round_can_be_enough(tmp_path, monkeypatch):
    run = run_qa(tmp_path, monkeypatch, [8], threshold=7.5, max_rounds=4)
    info = run.record.result["nodes"]["qa"]["info"]
    assert [r["score"] for r in info["rounds"]] == [8] and info["stopped"] == "threshold"
    assert run.llm.chats == []


def test_the_judge_node_ranks_images_and_keeps_the_top_n(tmp_path, monkeypatch):
    from graphs.payloads import parse_payload
    from graphs.workflow_jobs import node_runners
    from graphs.workflows import JudgeParams, Node, NodeContext
    from tests.unit.test_best_of import FakeJudge, grey_png

    judge = FakeJudge()
    monkeypatch.setattr(graph_vision, "judge_images", judge)
    storage = Storage(str(tmp_path / "root"))
    keys = [storage.put_bytes(f"outputs/2026/01/01/job_1.gen/{i}.png", grey_png(i)) for i in range(4)]
    spec = parse_payload("workflows.run", {"workflow": {"nodes": []}, "judge": {"model": "gemma"}})
    reported: dict = {}
    params = JudgeParams(n=2, criteria="sharp")
    ctx = NodeContext(Node(id="j", type="judge", params=params.model_dump()), params,
                      {"images": keys, "prompt": "a kite"}, lambda f: None, lambda: None, reported.update)
    out = node_runners({"llm": object()}, "job_1", spec, storage)["judge"](ctx)
    assert out["images"] == [keys[1], keys[2]]  # scores 3, 9, 9, 5
    assert [s["score"] for s in out["scores"]] == [9, 9, 5, 3]
    assert [s["image"] for s in out["scores"]] == [keys[1], keys[2], keys[3], keys[0]]
    assert reported["judged"] == out["scores"] and judge.calls[0]["criteria"] == "sharp"


# --- validation: one contract (deployments/llm/vision.py), the validate endpoint included --------------------


def check(app, doc: dict):
    return asyncio.run(app.services.workflows.check(doc))


@pytest.mark.parametrize("params, field, words", [
    ({"threshold": 11}, "params.threshold", "between 1 and 10"),
    ({"threshold": 0.5}, "params.threshold", "between 1 and 10"),
    ({"max_rounds": 6}, "params.max_rounds", "between 1 and 5"),
    ({"max_rounds": 0}, "params.max_rounds", "greater than or equal to 1"),
    ({"criteria": "x" * 1001}, "params.criteria", "at most 1000 characters"),
    ({"seed": 2**32 - 2, "max_rounds": 3}, "params.seed", "seed + max_rounds - 1"),
    ({"steps": 500}, "params.steps", "at most 50"),
])
def test_bad_qa_params_are_refused_naming_the_field(tmp_path, params, field, words):
    app = build(tmp_path)  # max_qa_rounds: 5 (the default)
    doc = qa_workflow(**params)
    report, workflow = check(app, doc)
    assert workflow is None
    assert [(e.node, e.field) for e in report.errors] == [("qa", field)]
    assert words in report.errors[0].message
    response = app.client.post("/v1/workflows/validate", json=doc)
    assert response.status_code == 200
    assert [(e["node"], e["field"]) for e in response.json()["errors"]] == [("qa", field)]
    run = app.client.post("/v1/workflows/runs", json={"workflow": doc})
    assert run.status_code == 400 and run.json()["error"]["param"] == f"nodes.qa.{field}"


def test_the_threshold_check_is_the_judge_contract_s(tmp_path):
    from deployments.errors import InvalidRequestError
    from deployments.llm.vision import check_threshold

    with pytest.raises(InvalidRequestError) as raised:
        check_threshold(11)
    report = validate_workflow(qa_workflow(threshold=11))
    assert report.errors[0].field == "params.threshold"
    assert raised.value.message in report.errors[0].message


def test_a_qa_loop_needs_the_language_model(tmp_path):
    app = build(tmp_path, llm=False)
    report, _ = check(app, qa_workflow())
    assert [(e.node, e.field) for e in report.errors] == [("qa", "type")]
    assert "llm" in report.errors[0].message


def test_a_run_pins_the_seed_for_every_round_and_what_the_loop_needs(tmp_path):
    app = build(tmp_path)
    doc = qa_workflow(max_rounds=4)
    del doc["nodes"][1]["params"]["seed"]
    accepted = app.client.post("/v1/workflows/runs", json={"workflow": doc})
    assert accepted.status_code == 202, accepted.text
    request = app.services.jobs.jobs.get(accepted.json()["id"]).request
    qa = next(n for n in request["workflow"]["nodes"] if n["id"] == "qa")
    assert 0 <= qa["params"]["seed"] <= 2**32 - 4  # seed + 3 fits
    assert request["refine"]["qa"]["model"] == "gemma" and request["judge"]["model"] == "gemma"
    assert request["judge"]["settings"]["max_reasons"] >= 1


# --- the template -------------------------------------------------------------------------------------------


def test_the_product_shot_template_validates_and_ends_in_a_video(tmp_path):
    template = TEMPLATES["product_shot_qa"]["workflow"]
    assert validate_workflow(template).valid
    types = {n["id"]: n["type"] for n in template["nodes"]}
    assert "qa_loop" in types.values()
    video = next(n for n, t in types.items() if t == "image_to_video")
    assert any(e["source"] == video and types[e["target"]] == "output" for e in template["edges"])
    listed = {t["id"]: t for t in list_templates({"sdxl", "svd", "llm"})}["product_shot_qa"]
    assert listed["requires"] == ["llm", "sdxl", "svd"] and listed["available"]
    # against the running app's models (an svd too), the service's checks pass
    app = build(tmp_path)
    app.services.models.limits["svd"] = _svd_limits()
    app.services.models.handles["svd"] = object()
    report, workflow = check(app, copy.deepcopy(template))
    assert report.valid and workflow is not None, report.errors


def _svd_limits():
    from deployments.svd.contract import SVDLimits

    return SVDLimits(model="svd", source="models/tiny/svd", default_width=64, default_height=64, min_size=32,
                     max_size=256, default_num_frames=4, max_num_frames=14, default_fps=7, min_fps=1, max_fps=30,
                     default_steps=2, max_steps=50, default_min_guidance_scale=1.0, default_max_guidance_scale=3.0,
                     default_decode_chunk_size=8, max_input_pixels=4096 * 4096)


def test_the_new_node_types_are_in_the_catalogue_with_typed_ports():
    assert NODE_TYPES["qa_loop"].outputs == {"image": "image", "prompt": "text", "rounds": "scores"}
    assert NODE_TYPES["qa_loop"].uses == ("llm",)
    assert NODE_TYPES["judge"].inputs["images"].type == "images"
    assert NODE_TYPES["judge"].outputs == {"images": "images", "scores": "scores"}
    assert "best_of" in NODE_TYPES["text_to_image"].params.model_fields
