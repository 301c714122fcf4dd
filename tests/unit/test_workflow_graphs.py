"""Workflow graphs: format, validation and the executor, with fake runners (no Ray, no models)."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from graphs.workflows import (
    NODE_TYPES,
    InMemoryWorkflowCache,
    Node,
    NodeContext,
    Workflow,
    WorkflowCancelled,
    cache_key,
    is_cacheable,
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


def test_param_errors() -> None:
    doc = txt2img_doc()
    doc["nodes"][1]["params"] = {"n": 3, "size": "big", "steps": 0, "seed": -1, "guidance_scale": 31, "colour": 1}
    doc["nodes"][3]["params"] = {"noise_level": -1}
    found = issues(doc)
    assert {("gen", "params.n"), ("gen", "params.size"), ("gen", "params.steps"), ("gen", "params.seed"),
            ("gen", "params.guidance_scale"), ("gen", "params.colour"), ("up", "params.noise_level")} <= found


def test_every_error_is_reported_together() -> None:
    doc = txt2img_doc()
    doc["nodes"].append(node("p", "prompt", text="dup"))
    doc["nodes"][1]["params"]["steps"] = 0
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
    # each progress report is counted on the node, so a job shows which nodes streamed progress
    assert (result.nodes["gen"].progress_updates, result.nodes["up"].progress_updates) == (1, 0)


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


def test_a_node_stopped_by_its_deployment_after_a_cancel_is_cancelled_not_failed() -> None:
    cancelled = threading.Event()

    def gen(ctx: NodeContext) -> dict[str, Any]:
        cancelled.set()  # the replica sees the cancel marker before the workflow's own check does
        raise RuntimeError("interrupted: job cancelled")

    result = run_workflow(Workflow.model_validate(txt2img_doc()), {"text_to_image": gen, "upscale": gen},
                          is_cancelled=cancelled.is_set)
    assert result.status == "cancelled"
    assert {result.nodes[v].status for v in ("gen", "pick", "up", "out")} == {"cancelled"}


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


def test_key_params_take_only_stored_outputs() -> None:
    def doc(key: str) -> dict[str, Any]:
        return {"nodes": [node("i", "image", key=key), node("o", "output")], "edges": [edge("i.image", "o.value")]}

    assert validate_workflow(doc("outputs/2026/01/01/job/0.png")).valid
    # the rule of the HTTP image_key fields: job records, uploads, LoRA weights and escapes are refused
    for key in ("jobs/job_1.json", "uploads/u/image", "models/loras/corgi/1/pytorch_lora_weights.safetensors",
                "outputs/../jobs/job_1.json", "/etc/passwd", "outputs//a.png", "outputs/a*.png"):
        assert issues(doc(key)) == {("i", "params.key")}, key


def test_refine_seed_makes_it_cacheable() -> None:
    refine = {"id": "r", "type": "refine", "params": {}}
    assert "seed" in NODE_TYPES["refine"].params.model_fields
    assert not is_cacheable(Node.model_validate(refine))  # an unpinned refine samples anew each run
    assert is_cacheable(Node.model_validate({**refine, "params": {"seed": 5}}))
    assert issues({"nodes": [node("p", "prompt", text="x"), node("r", "refine", seed=-1), node("o", "output")],
                   "edges": [edge("p.text", "r.prompt"), edge("r.prompt", "o.value")]}) == {("r", "params.seed")}


def test_cache_key_holds_the_model_so_a_swap_recomputes() -> None:
    gen = Node.model_validate(node("gen", "text_to_image", seed=1))
    inputs = {"prompt": "a cat"}
    assert cache_key(gen, inputs, "stabilityai/sdxl-base-1.0") != cache_key(gen, inputs, "acme/sdxl-finetune")
    assert cache_key(gen, inputs, "stabilityai/sdxl-base-1.0") == cache_key(gen, inputs, "stabilityai/sdxl-base-1.0")

    cache = InMemoryWorkflowCache()
    wf = Workflow.model_validate(txt2img_doc(seed=7))
    run_workflow(wf, FakeRunners().as_dict(), cache=cache, model_ids={"sdxl": "sdxl-a", "upscaler": "x4"})
    swapped = FakeRunners()
    result = run_workflow(wf, swapped.as_dict(), cache=cache, model_ids={"sdxl": "sdxl-b", "upscaler": "x4"})
    assert [c[0] for c in swapped.calls] == ["gen"]  # the new SDXL reruns; the upscaler's key is unchanged
    assert (result.nodes["gen"].status, result.nodes["up"].status) == ("completed", "cached")


# ------------------------------------------------------- checks against the running models (WorkflowsService)

class FakeQueue:
    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        pass


class FakeLoras:
    """The LoRA registry, as ModelsService reads it: `corgi` is registered (latest version 2)."""

    def resolve(self, ref: str, param: str = "lora"):
        from storage.registry import LoraNotFoundError

        if not ref.startswith("corgi"):
            raise LoraNotFoundError(f"no LoRA named {ref!r}", param)
        return SimpleNamespace(id="corgi:2", name="corgi", version=2, sha256="ab" * 32, trigger_word="sks",
                               owner=None, public=False)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def workflows(tmp_path):
    """The real WorkflowsService over fake handles, the models' contract Limits, and local storage."""
    from api.files.service import FilesService
    from api.jobs.service import JobsService
    from api.models.service import ModelsService
    from api.text.service import TextService
    from api.workflows.service import build_workflows_service
    from deployments.llm.contract import GemmaLimits, RefineSettings
    from deployments.sdxl.contract import SDXLLimits
    from deployments.styles import StylePreset
    from deployments.svd.contract import SVDLimits
    from deployments.upscaler.contract import UpscalerLimits
    from graphs.job_runner import JobQueueConfig
    from storage import Storage
    from storage.jobs import JobStore

    storage = Storage(str(tmp_path / "root"))
    limits = {
        "sdxl": SDXLLimits(model="sdxl", source="models/tiny/sdxl", default_size=64, min_size=32, max_size=512,
                           default_steps=4, max_steps=50, default_guidance_scale=5.0,
                           styles={"noir": StylePreset(prompt="{prompt}, film noir")}),
        "upscaler": UpscalerLimits(model="upscaler", source="models/tiny/upscaler", scale=4, min_input_size=16,
                                   max_input_size=256, tile_size=256, tile_overlap=32, default_steps=20, max_steps=50,
                                   default_noise_level=20, max_noise_level=250, max_frames=16),
        "svd": SVDLimits(model="svd", source="models/tiny/svd", default_width=64, default_height=64, min_size=32,
                         max_size=256, default_num_frames=14, max_num_frames=14, default_fps=7, min_fps=1, max_fps=30,
                         default_steps=4, max_steps=50, default_min_guidance_scale=1.0, default_max_guidance_scale=3.0,
                         default_decode_chunk_size=8, max_input_pixels=4096 * 4096),
        "llm": GemmaLimits(model="gemma", source="models/tiny/gemma", max_model_len=512),
    }
    handles = {name: object() for name in limits}
    files = FilesService(storage, presign_urls=False)
    jobs = JobsService(JobStore(storage), FakeQueue(), JobQueueConfig(broker_url="x", backend_url="y"), files)
    models = ModelsService(handles, limits, FakeLoras(), 1.0)
    text = TextService(handles["llm"], limits["llm"], RefineSettings(), models)
    return build_workflows_service(storage, jobs, models, text, max_nodes=100)


def check(workflows, doc: dict[str, Any]):
    return asyncio.run(workflows.check(doc))


def test_video_and_upscale_params_are_checked_against_the_models(workflows) -> None:
    doc = {
        "nodes": [node("p", "prompt", text="a kite"), node("t", "text_to_image", size="128x128", steps=2, seed=1),
                  node("s", "select"), node("up1", "upscale", steps=80, noise_level=300),
                  node("up2", "upscale"),  # 128 → 512: too large an input for the upscaler
                  node("v", "image_to_video", size="2048x2048", num_frames=60, steps=150, fps=45),
                  node("o1", "output"), node("o2", "output")],
        "edges": [edge("p.text", "t.prompt"), edge("t.images", "s.images"), edge("s.image", "up1.image"),
                  edge("up1.image", "up2.image"), edge("up2.image", "o1.value"),
                  edge("s.image", "v.image"), edge("v.video", "o2.value")],
    }
    assert validate_workflow(doc).valid  # structurally fine: only the running models' limits refuse it
    report, workflow = check(workflows, doc)
    assert workflow is None and not report.valid
    found = {(e.node, e.field): e.message for e in report.errors}
    assert set(found) == {("up1", "params.steps"), ("up1", "params.noise_level"), ("up2", "inputs.image"),
                          ("v", "params.size"), ("v", "params.num_frames"), ("v", "params.steps"),
                          ("v", "params.fps")}, found
    assert "512x512" in found[("up2", "inputs.image")] and "256" in found[("up2", "inputs.image")]
    assert found[("v", "params.num_frames")] == "num_frames must be between 1 and 14; got 60"
    assert found[("v", "params.steps")] == "steps must be at most 50; got 150"
    assert "2048x2048" in found[("v", "params.size")]
    assert report.order  # the execution order still comes back

    fixed = json.loads(json.dumps(doc))
    fixed["nodes"][3]["params"] = {"steps": 2}
    fixed["nodes"][4]["params"] = {"steps": 2}
    fixed["nodes"][1]["params"]["size"] = "32x32"  # up1 makes 128x128, which up2 takes
    fixed["nodes"][5]["params"] = {"size": "64x64", "num_frames": 3, "steps": 2, "fps": 6}
    report, workflow = check(workflows, fixed)
    assert report.valid and workflow is not None, report.errors


def test_stored_images_and_masks_must_exist_and_match(workflows) -> None:
    workflows.storage.put_bytes("outputs/a/0.png", png(64, 48))
    workflows.storage.put_bytes("outputs/a/mask.png", png(32, 32, "L"))
    workflows.storage.put_bytes("outputs/a/notes.txt", b"not an image")
    doc = {
        "nodes": [node("p", "prompt", text="a kite"), node("img", "image", key="outputs/a/0.png"),
                  node("m", "mask", key="outputs/a/mask.png"), node("gone", "image", key="outputs/missing.png"),
                  node("txt", "image", key="outputs/a/notes.txt"),
                  node("paint", "inpaint", steps=1, strength=0.5, seed=1), node("up", "upscale", seed=1),
                  node("o", "output"), node("o2", "output"), node("o3", "output")],
        "edges": [edge("p.text", "paint.prompt"), edge("img.image", "paint.image"), edge("m.mask", "paint.mask"),
                  edge("paint.images", "o.value"), edge("gone.image", "up.image"), edge("up.image", "o2.value"),
                  edge("txt.image", "o3.value")],
    }
    report, workflow = check(workflows, doc)
    assert workflow is None
    found = {(e.node, e.field): e.message for e in report.errors}
    assert set(found) == {("gone", "params.key"), ("txt", "params.key"), ("paint", "inputs.mask"),
                          ("paint", "params.steps")}, found
    assert found[("gone", "params.key")] == "no stored output at 'outputs/missing.png'"
    assert found[("txt", "params.key")] == "'outputs/a/notes.txt' is not an image"
    assert found[("paint", "inputs.mask")] == "mask is 32x32 but image is 64x48; they must match"
    assert "leaves no denoising step" in found[("paint", "params.steps")]  # int(1 × 0.5) = 0


def test_run_payload_pins_every_seed_refine_included_and_the_lora_hash(workflows) -> None:
    doc = {"nodes": [node("p", "prompt", text="a corgi"), node("r", "refine", lora="corgi"),
                     node("t", "text_to_image", lora="corgi", n=8), node("o", "output")],
           "edges": [edge("p.text", "r.prompt"), edge("r.prompt", "t.prompt"), edge("t.images", "o.value")]}
    payload = asyncio.run(workflows.run_payload(Workflow.model_validate(doc), True, None))
    nodes = {n["id"]: n for n in payload["workflow"]["nodes"]}
    seeded = [n for n in nodes.values() if "seed" in NODE_TYPES[n["type"]].params.model_fields]
    assert {n["id"] for n in seeded} == {"r", "t"}
    assert all(isinstance(n["params"]["seed"], int) for n in seeded)
    assert nodes["t"]["params"]["seed"] + 7 <= 2**32 - 1  # room for the 8 images' seeds
    assert nodes["t"]["params"]["lora"] == nodes["r"]["params"]["lora"] == "corgi:2"
    assert payload["loras"] == {"corgi:2": {"name": "corgi", "version": 2, "sha256": "ab" * 32}}
    assert payload["refine"]["r"]["source"] == "models/tiny/gemma"
    assert validate_workflow(payload["workflow"]).valid


# ------------------------------------------------------------------------------------ lineage


class FakeDescribe:
    def __init__(self, info: dict) -> None:
        self.describe = SimpleNamespace(remote=lambda: SimpleNamespace(result=lambda timeout_s=None: info))


def test_workflow_lineage_names_models_loras_seeds_and_job() -> None:
    from graphs.payloads import parse_payload
    from graphs.workflow_jobs import _lineage, model_ids

    doc = {"nodes": [node("p", "prompt", text="a corgi"), node("r", "refine", seed=4),
                     node("t", "text_to_image", lora="corgi:2", seed=9), node("s", "select"),
                     node("u", "upscale", seed=3), node("o", "output")],
           "edges": [edge("p.text", "r.prompt"), edge("r.prompt", "t.prompt"), edge("t.images", "s.images"),
                     edge("s.image", "u.image"), edge("u.image", "o.value")]}
    workflow = Workflow.model_validate(doc)
    spec = parse_payload("workflows.run", {
        "workflow": doc, "refine": {"r": {"model": "gemma", "source": "google/gemma-3-1b-it"}},
        "loras": {"corgi:2": {"name": "corgi", "version": 2, "sha256": "ab" * 32}},
        "saved": {"id": "wf_1", "version": 3, "name": "corgis"}})
    handles = {"sdxl": FakeDescribe({"model": "sdxl", "source": "stabilityai/stable-diffusion-xl-base-1.0"}),
               "upscaler": FakeDescribe({"model": "x4", "source": "stabilityai/stable-diffusion-x4-upscaler"}),
               "svd": FakeDescribe({"model": "svd", "source": "never-asked"})}
    models = model_ids(handles, workflow, spec)
    assert models == {"llm": "google/gemma-3-1b-it", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                      "upscaler": "stabilityai/stable-diffusion-x4-upscaler"}  # svd is not used: not asked

    lineage = _lineage(workflow, "o", spec, "job_1", models)
    assert lineage["job_id"] == "job_1" and lineage["workflow"] == {"id": "wf_1", "version": 3, "name": "corgis"}
    assert lineage["seeds"] == {"r": 4, "t": 9, "u": 3}
    by_id = {n["id"]: n for n in lineage["nodes"]}
    assert [n["id"] for n in lineage["nodes"]][-1] == "o" and set(by_id) == {"p", "r", "t", "s", "u", "o"}
    assert by_id["t"]["model_id"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert by_id["t"]["lora"] == {"name": "corgi", "version": 2, "sha256": "ab" * 32}
    assert by_id["r"]["model_id"] == "google/gemma-3-1b-it"
    assert by_id["u"]["model_id"] == "stabilityai/stable-diffusion-x4-upscaler"
    assert "model_id" not in by_id["s"]  # built-ins run on no model


class FakeJobContext:
    def __init__(self, request: dict) -> None:
        from graphs.payloads import parse_payload

        self.id = "job_42"
        self.payload = parse_payload("images.generations", request)
        self.record = SimpleNamespace(kind="images.generations", result=None)
        self.outputs: list = []

    def start_stage(self, stage: str) -> None: ...

    def step(self, step: int, total: int) -> None: ...

    def check_cancelled(self) -> None: ...

    def add_output(self, output) -> None:
        self.outputs.append(output)


class FakeSDXLHandle:
    """Answers generate_stream with one progress event and the response."""

    def __init__(self) -> None:
        self.requests: list = []

    def options(self, **_: Any) -> "FakeSDXLHandle":
        return self

    @property
    def generate_stream(self) -> SimpleNamespace:
        from deployments.sdxl.contract import SDXLImage, SDXLProgress, SDXLResponse

        def remote(request):
            self.requests.append(request)
            images = [SDXLImage(seed=request.seed + i, width=64, height=64, key=f"outputs/x/{i}.png")
                      for i in range(request.n)]
            return [SDXLProgress(step=1, total_steps=1),
                    SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt, negative_prompt="",
                                 steps=2, guidance_scale=5.0, images=images, lora=request.lora,
                                 source="stabilityai/stable-diffusion-xl-base-1.0", lora_sha256="cd" * 32,
                                 batch_images=request.n, elapsed_s=0.1)]

        return SimpleNamespace(remote=remote)


def test_image_job_outputs_carry_lineage_with_the_job_id_outside_the_png() -> None:
    from graphs.pipelines import image_generation

    ctx = FakeJobContext({"sdxl": {"prompt": "a pear", "n": 2, "seed": 11, "lora": "pear:1", "steps": 2}})
    handle = FakeSDXLHandle()
    image_generation(ctx, {"sdxl": handle})
    assert handle.requests[0].job_id == "job_42"  # the deployment gets the job id only to name its files
    assert [o.seed for o in ctx.outputs] == [11, 12]
    for output in ctx.outputs:
        lineage = output.extra["lineage"]
        assert lineage["job_id"] == "job_42" and lineage["kind"] == "images.generations"
        assert lineage["seed"] == output.seed and lineage["request"]["prompt"] == "a pear"
        assert lineage["model_id"] == "stabilityai/stable-diffusion-xl-base-1.0"
        assert lineage["lora"] == {"name": "pear", "version": 1, "sha256": "cd" * 32}
        assert "job_id" not in lineage["request"]
    assert ctx.record.result["seeds"] == [11, 12] and ctx.record.result["lora"]["sha256"] == "cd" * 32
