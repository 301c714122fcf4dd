"""Workflow graphs: format, validation and the executor, with fake runners (no Ray, no models)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from graphs.workflows import (
    NODE_TYPES,
    InMemoryWorkflowCache,
    NodeContext,
    Workflow,
    WorkflowCancelled,
    run_workflow,
    validate_workflow,
    workflow_schema,
)


def node(id: str, type: str, **params: Any) -> dict[str, Any]:
    return {"id": id, "type": type, "params": params}


def edge(src: str, dst: str) -> dict[str, str]:
    """'a.port' -> 'b.port'."""
    s, sp = src.split(".")
    t, tp = dst.split(".")
    return {"source": s, "source_port": sp, "target": t, "target_port": tp}


def txt2img_doc(seed: int | None = 7) -> dict[str, Any]:
    return {
        "nodes": [
            node("p", "prompt", text="a cat"),
            node("gen", "text_to_image", n=2, seed=seed),
            node("pick", "select", index=1),
            node("up", "upscale", seed=3),
            node("out", "output", name="final"),
        ],
        "edges": [
            edge("p.text", "gen.prompt"),
            edge("gen.images", "pick.images"),
            edge("pick.image", "up.image"),
            edge("up.image", "out.value"),
        ],
    }


def issues(doc: Any, **kwargs: Any) -> set[tuple[str | None, str | None]]:
    report = validate_workflow(doc, **kwargs)
    assert not report.valid
    return {(e.node, e.field) for e in report.errors}


def messages(doc: Any, **kwargs: Any) -> list[str]:
    return [e.message for e in validate_workflow(doc, **kwargs).errors]


class FakeRunners:
    """Model runners that return fake storage keys and record what they were called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def _record(self, ctx: NodeContext) -> None:
        with self.lock:
            self.calls.append((ctx.node_id, dict(ctx.inputs)))

    def text_to_image(self, ctx: NodeContext) -> dict[str, Any]:
        self._record(ctx)
        ctx.progress(0.5)
        return {"images": [f"outputs/{ctx.node_id}-{i}.png" for i in range(ctx.params.n)]}

    def upscale(self, ctx: NodeContext) -> dict[str, Any]:
        self._record(ctx)
        return {"image": ctx.inputs["image"].replace(".png", "-x4.png")}

    def as_dict(self) -> dict[str, Any]:
        return {"text_to_image": self.text_to_image, "upscale": self.upscale}


# ------------------------------------------------------------------------------------ format


def test_schema_is_json_and_lists_node_types() -> None:
    schema = workflow_schema()
    text = json.dumps(schema)
    assert set(schema["node_types"]) == set(NODE_TYPES)
    assert "text_to_image" in json.dumps(Workflow.model_json_schema())
    assert schema["node_types"]["text_to_image"]["deployment"] == "sdxl"
    assert "image_to_video" in text


def test_valid_workflow_and_order() -> None:
    report = validate_workflow(txt2img_doc())
    assert report.valid, report.errors
    assert report.order == ["p", "gen", "pick", "up", "out"]


def test_order_is_stable_by_appearance() -> None:
    doc = {
        "nodes": [node("o2", "output"), node("b", "prompt", text="b"),
                  node("o1", "output"), node("a", "prompt", text="a")],
        "edges": [edge("a.text", "o1.value"), edge("b.text", "o2.value")],
    }
    # Ready nodes go by document position: o2 (made ready by b) comes before a.
    assert validate_workflow(doc).order == ["b", "o2", "a", "o1"]


# -------------------------------------------------------------------------------- validation


def test_unparseable_doc_gives_field_paths() -> None:
    doc = {"nodes": [{"id": "bad id!", "type": "prompt"}], "edges": [{"source": "x"}]}
    found = issues(doc)
    assert ("bad id!", "nodes.0.id") in found
    assert (None, "edges.0.source_port") in found
    assert issues("not a dict") == {(None, None)}


def test_duplicate_ids_unknown_type_and_missing_deployment() -> None:
    doc = txt2img_doc()
    doc["nodes"] += [node("p", "prompt", text="again"), node("weird", "teleport")]
    found = issues(doc, available_deployments={"sdxl", "llm"})
    assert ("p", "id") in found
    assert ("weird", "type") in found
    assert ("up", "type") in found
    text = messages(doc, available_deployments={"sdxl", "llm"})
    assert any("known types:" in m and "text_to_image" in m for m in text)
    assert "node type upscale needs the upscaler deployment, which this application does not deploy" in text


def test_edges_to_unknown_nodes_and_ports() -> None:
    doc = txt2img_doc()
    doc["edges"] += [edge("ghost.text", "gen.negative_prompt"), edge("p.text", "nowhere.x"),
                     edge("p.text", "up.style"), edge("p.nope", "gen.negative_prompt")]
    found = issues(doc)
    assert {("ghost", "edges.4.source"), ("nowhere", "edges.5.target"),
            ("up", "inputs.style"), ("p", "outputs.nope")} <= found


def test_two_edges_into_one_input() -> None:
    doc = txt2img_doc()
    doc["nodes"].append(node("p2", "prompt", text="a dog"))
    doc["edges"].append(edge("p2.text", "gen.prompt"))
    assert issues(doc) == {("gen", "inputs.prompt")}


def test_missing_required_input() -> None:
    doc = txt2img_doc()
    doc["edges"] = [e for e in doc["edges"] if e["target"] != "gen"]
    doc["nodes"] = [n for n in doc["nodes"] if n["id"] != "p"]
    assert issues(doc) == {("gen", "inputs.prompt")}


def test_type_mismatch_suggests_select() -> None:
    doc = txt2img_doc()
    doc["edges"][2] = edge("gen.images", "up.image")
    doc["nodes"] = [n for n in doc["nodes"] if n["id"] != "pick"]
    doc["edges"] = [e for e in doc["edges"] if e["target"] != "pick"]
    assert issues(doc) == {("up", "inputs.image")}
    assert messages(doc) == ["edge gen.images → up.image: images does not fit an image input; use a select node"]


def test_image_into_images_is_a_mismatch() -> None:
    doc = {"nodes": [node("i", "image", key="outputs/a.png"), node("s", "select"), node("o", "output")],
           "edges": [edge("i.image", "s.images"), edge("s.image", "o.value")]}
    assert issues(doc) == {("s", "inputs.images")}


def test_output_accepts_any_type() -> None:
    doc = {"nodes": [node("i", "image", key="outputs/a.png"), node("v", "image_to_video"),
                     node("o1", "output"), node("o2", "output"), node("o3", "output")],
           "edges": [edge("i.image", "v.image"), edge("v.video", "o1.value"),
                     edge("i.image", "o2.value")]}
    # o3 has no value: the only issue is its missing required input.
    assert issues(doc) == {("o3", "inputs.value")}


def test_cycle_reported_once_in_order() -> None:
    doc = {"nodes": [node("p", "prompt", text="x"), node("a", "refine"), node("b", "refine"),
                     node("c", "refine"), node("o", "output")],
           "edges": [edge("a.prompt", "b.prompt"), edge("b.prompt", "c.prompt"),
                     edge("c.prompt", "a.prompt"), edge("c.negative_prompt", "o.value")]}
    report = validate_workflow(doc)
    cycles = [e for e in report.errors if e.message.startswith("cycle")]
    assert [(e.node, e.field, e.message) for e in cycles] == [("a", None, "cycle: a → b → c → a")]
    assert report.order == []
    assert ("p", None) in {(e.node, e.field) for e in report.errors}  # p leads nowhere


def test_no_output_and_dead_nodes() -> None:
    doc = txt2img_doc()
    doc["nodes"] = [n for n in doc["nodes"] if n["id"] != "out"]
    doc["edges"] = doc["edges"][:3]
    assert issues(doc) == {(None, None)}
    assert messages(doc) == ["the workflow has no output node"]

    doc = txt2img_doc()
    doc["nodes"].append(node("extra", "text_to_image"))
    doc["edges"].append(edge("p.text", "extra.prompt"))
    assert issues(doc) == {("extra", None)}
    assert messages(doc) == ["node extra does not lead to any output"]


def test_param_errors_and_limits() -> None:
    doc = txt2img_doc()
    doc["nodes"][1]["params"] = {"n": 3, "size": "big", "steps": 0, "seed": -1, "guidance_scale": 31, "colour": 1}
    doc["nodes"][3]["params"] = {"noise_level": 351}
    found = issues(doc)
    assert {("gen", "params.n"), ("gen", "params.size"), ("gen", "params.steps"), ("gen", "params.seed"),
            ("gen", "params.guidance_scale"), ("gen", "params.colour"), ("up", "params.noise_level")} <= found

    doc = txt2img_doc()
    doc["nodes"][1]["params"] = {"n": 8, "steps": 100}
    limits = {"text_to_image": {"max_steps": 50, "max_n": 4}}
    assert issues(doc, limits=limits) == {("gen", "params.steps"), ("gen", "params.n")}
    assert validate_workflow(txt2img_doc(), limits=limits).valid


def test_every_error_is_reported_together() -> None:
    doc = txt2img_doc()
    doc["nodes"].append(node("p", "prompt", text="dup"))
    doc["nodes"][1]["params"]["steps"] = 500
    doc["edges"].append(edge("p.text", "up.prompt"))
    doc["edges"].append(edge("p.text", "up.prompt"))
    assert {("p", "id"), ("gen", "params.steps"), ("up", "inputs.prompt")} <= issues(doc)


def test_node_cap() -> None:
    doc = {"nodes": [node(f"n{i}", "prompt", text="x") for i in range(501)], "edges": []}
    assert issues(doc) == {(None, "nodes")}
    configured = validate_workflow({**doc, "nodes": doc["nodes"][:201]}, max_nodes=200)
    assert [(e.node, e.field) for e in configured.errors] == [(None, "nodes")] and "at most 200" in configured.errors[0].message


# --------------------------------------------------------------------------------- execution


def test_run_chain_outputs_and_progress() -> None:
    fakes = FakeRunners()
    updates: list[dict[str, Any]] = []
    result = run_workflow(Workflow.model_validate(txt2img_doc()), fakes.as_dict(), on_update=updates.append)
    assert result.status == "completed"
    assert result.outputs == {"final": "outputs/gen-1-x4.png"}
    assert [c[0] for c in fakes.calls] == ["gen", "up"]
    assert fakes.calls[0][1] == {"prompt": "a cat"}
    assert any(u["gen"].status == "running" and u["gen"].progress == 50 for u in updates)
    assert all(s.status == "completed" and s.progress == 100 for s in result.nodes.values())
    assert result.nodes["gen"].started_at <= result.nodes["gen"].finished_at


def test_invalid_workflow_is_refused() -> None:
    doc = txt2img_doc()
    doc["edges"].pop()
    with pytest.raises(ValueError, match="out.inputs.value"):
        run_workflow(Workflow.model_validate(doc), FakeRunners().as_dict())


def two_branches() -> dict[str, Any]:
    return {
        "nodes": [node("p", "prompt", text="x"), node("a", "text_to_image", seed=1),
                  node("b", "text_to_image", seed=2), node("oa", "output"), node("ob", "output")],
        "edges": [edge("p.text", "a.prompt"), edge("p.text", "b.prompt"),
                  edge("a.images", "oa.value"), edge("b.images", "ob.value")],
    }


def test_independent_branches_run_concurrently() -> None:
    barrier = threading.Barrier(2, timeout=5)

    def gen(ctx: NodeContext) -> dict[str, Any]:
        barrier.wait()  # both branches must be inside a runner at once, or this times out
        return {"images": [f"outputs/{ctx.node_id}.png"]}

    result = run_workflow(Workflow.model_validate(two_branches()), {"text_to_image": gen})
    assert result.status == "completed"
    assert result.outputs == {"oa": ["outputs/a.png"], "ob": ["outputs/b.png"]}


def test_failure_propagates_only_downstream() -> None:
    doc = two_branches()
    doc["nodes"].append(node("pick", "select"))
    doc["edges"][2] = edge("a.images", "pick.images")
    doc["edges"].append(edge("pick.image", "oa.value"))

    def gen(ctx: NodeContext) -> dict[str, Any]:
        if ctx.node_id == "a":
            raise RuntimeError("CUDA out of memory")
        time.sleep(0.05)
        return {"images": ["outputs/b.png"]}

    result = run_workflow(Workflow.model_validate(doc), {"text_to_image": gen})
    assert result.status == "failed"
    nodes = result.nodes
    assert (nodes["a"].status, nodes["a"].error) == ("failed", "RuntimeError: CUDA out of memory")
    for v in ("pick", "oa"):
        assert nodes[v].status == "failed"
        assert nodes[v].error == "upstream node a failed: RuntimeError: CUDA out of memory"
    assert nodes["b"].status == nodes["ob"].status == "completed"
    assert result.outputs == {"ob": ["outputs/b.png"]}


def test_select_out_of_range_fails_clearly() -> None:
    doc = txt2img_doc()
    doc["nodes"][2]["params"]["index"] = 5
    result = run_workflow(Workflow.model_validate(doc), FakeRunners().as_dict())
    assert result.status == "failed"
    assert result.nodes["pick"].error == "IndexError: index 5 is out of range: the input has 2 image(s)"
    assert result.nodes["up"].status == "failed"


def test_cancel_stops_pending_nodes() -> None:
    cancelled = threading.Event()
    started = threading.Event()

    def gen(ctx: NodeContext) -> dict[str, Any]:
        started.set()
        for _ in range(100):  # a long denoising loop that checks for cancel every step
            ctx.check_cancelled()
            time.sleep(0.02)
        return {"images": ["outputs/x.png"]}

    def cancel_soon() -> None:
        started.wait(5)
        cancelled.set()

    threading.Thread(target=cancel_soon, daemon=True).start()
    t0 = time.monotonic()
    result = run_workflow(Workflow.model_validate(txt2img_doc()), {"text_to_image": gen, "upscale": gen},
                          is_cancelled=cancelled.is_set)
    assert time.monotonic() - t0 < 1.5
    assert result.status == "cancelled"
    assert result.nodes["p"].status == "completed"
    assert {result.nodes[v].status for v in ("gen", "pick", "up", "out")} == {"cancelled"}
    assert result.outputs == {}


def test_cancel_before_start_runs_nothing() -> None:
    fakes = FakeRunners()
    result = run_workflow(Workflow.model_validate(txt2img_doc()), fakes.as_dict(), is_cancelled=lambda: True)
    assert result.status == "cancelled"
    assert fakes.calls == []
    assert all(s.status == "cancelled" for s in result.nodes.values())


def test_cache_hits_on_same_params_and_seed() -> None:
    cache = InMemoryWorkflowCache()
    first, second = FakeRunners(), FakeRunners()
    wf = Workflow.model_validate(txt2img_doc(seed=7))
    r1 = run_workflow(wf, first.as_dict(), cache=cache)
    r2 = run_workflow(wf, second.as_dict(), cache=cache)
    assert [c[0] for c in first.calls] == ["gen", "up"]
    assert second.calls == []
    assert r2.nodes["gen"].status == r2.nodes["up"].status == "cached"
    assert r2.nodes["gen"].cache_key == r1.nodes["gen"].cache_key is not None
    assert r2.nodes["p"].status == "completed"  # built-ins are never cached
    assert r2.outputs == r1.outputs

    # A different seed is a different key; the fake returns the same key, so `up` (same input) still hits.
    third = FakeRunners()
    r3 = run_workflow(Workflow.model_validate(txt2img_doc(seed=8)), third.as_dict(), cache=cache)
    assert [c[0] for c in third.calls] == ["gen"]
    assert r3.nodes["up"].status == "cached"
    # use_cache=False runs everything again.
    fourth = FakeRunners()
    r4 = run_workflow(wf, fourth.as_dict(), cache=cache, use_cache=False)
    assert [c[0] for c in fourth.calls] == ["gen", "up"]
    assert r4.nodes["gen"].status == "completed"


def test_seed_none_and_cache_false_are_never_cached() -> None:
    cache = InMemoryWorkflowCache()
    doc = txt2img_doc(seed=None)
    doc["nodes"][3]["cache"] = False  # upscale opts out
    wf = Workflow.model_validate(doc)
    run_workflow(wf, FakeRunners().as_dict(), cache=cache)
    again = FakeRunners()
    result = run_workflow(wf, again.as_dict(), cache=cache)
    assert [c[0] for c in again.calls] == ["gen", "up"]
    assert result.nodes["gen"].cache_key is None


def test_runner_must_return_declared_outputs() -> None:
    result = run_workflow(Workflow.model_validate(txt2img_doc()),
                          {**FakeRunners().as_dict(), "text_to_image": lambda ctx: {"image": "x"}})
    assert result.nodes["gen"].status == "failed"
    assert "returned no images output" in result.nodes["gen"].error


def test_workflow_cancelled_from_runner_is_cancelled() -> None:
    def gen(ctx: NodeContext) -> dict[str, Any]:
        raise WorkflowCancelled("stop")

    result = run_workflow(Workflow.model_validate(txt2img_doc()), {"text_to_image": gen, "upscale": gen})
    assert result.status == "cancelled"
    assert result.nodes["gen"].status == "cancelled"
