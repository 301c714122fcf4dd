"""Best-of-n (issue 19, item 4): k candidates generated, judged by the LLM, the top n returned ranked.

No Ray and no models: SDXL is a fake handle that paints each candidate a grey level equal to its
seed's offset, and the judge (graphs/vision.judge_images) is replaced by one that reads that grey
level back and returns a fixed score for it, so the ranking is known. The job is the real pipeline
(graphs/pipelines.image_generation) over a real JobStore; the API is the app as the ingress builds
it (typed args, every service) with the fake queue running that pipeline in a thread.
"""

from __future__ import annotations

import base64
import io
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import AtelierArgs, model_limits
from api.ingress import create_app
from api.services import build_services
from deployments.llm.vision import Judgement
from deployments.sdxl.contract import SDXLImage, SDXLProgress, SDXLRequest, SDXLResponse
from graphs import vision as graph_vision
from graphs.job_runner import JobContext
from graphs.payloads import ImageGenerationPayload
from graphs.pipelines import candidate_batches, image_generation
from storage.fs import Storage
from storage.jobs import JobStore

LOCAL = "http://127.0.0.1:8000"
SEED = 1000
# candidate i (seed SEED + i) -> its score: ties at 9 go to the lower index.
SCORES = {0: 3, 1: 9, 2: 9, 3: 5, 4: 2, 5: 10, 6: 1, 7: 4}


def grey_png(level: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), level).save(buffer, format="PNG")
    return buffer.getvalue()


def level_of(png: bytes) -> int:
    return Image.open(io.BytesIO(png)).getpixel((0, 0))


class FakeSDXL:
    """SDXL's streaming call: a progress event, then the images (PNG bytes unless stored); candidate
    seed s is painted grey level s - SEED."""

    def __init__(self, storage: Storage | None = None) -> None:
        self.requests: list[SDXLRequest] = []
        self.storage = storage
        self.lock = threading.Lock()

    def options(self, **_: Any) -> "FakeSDXL":
        return self

    @property
    def generate_stream(self) -> SimpleNamespace:
        def remote(request: SDXLRequest):
            with self.lock:
                self.requests.append(request)
            seed = request.seed if request.seed is not None else SEED
            images = []
            for i in range(request.n):
                png = grey_png(seed + i - SEED)
                image = SDXLImage(seed=seed + i, width=8, height=8)
                if request.store:
                    image.key = self.storage.put_bytes(f"outputs/2026/01/01/{request.output_id}/{i}.png", png)
                else:
                    image.png = png
                images.append(image)
            return FakeStream([SDXLProgress(step=1, total_steps=2), SDXLProgress(step=2, total_steps=2),
                               SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt,
                                            negative_prompt="", steps=2, guidance_scale=5.0, images=images,
                                            source="models/tiny/sdxl", batch_images=request.n, elapsed_s=0.01)])

        return SimpleNamespace(remote=remote)


class FakeStream(list):
    def cancel(self) -> None:
        pass


class FakeJudge:
    """graphs/vision.judge_images with fixed scores (by the candidate's grey level)."""

    def __init__(self, scores: dict[int, int] = SCORES) -> None:
        self.scores = scores
        self.calls: list[dict] = []

    def __call__(self, handle, images: list[bytes], prompt: str, model_id: str, settings, criteria=None):
        self.calls.append({"images": len(images), "prompt": prompt, "model": model_id, "criteria": criteria})
        return [Judgement(score=self.scores[level_of(png)], reasons=[f"grey {level_of(png)}"],
                          defects=[] if self.scores[level_of(png)] > 5 else ["dull"],
                          matches_prompt=self.scores[level_of(png)] > 5) for png in images]


@pytest.fixture()
def judge(monkeypatch) -> FakeJudge:
    fake = FakeJudge()
    monkeypatch.setattr(graph_vision, "judge_images", fake)
    return fake


def best_of_request(candidates: int, n: int, **sdxl: Any) -> dict:
    return ImageGenerationPayload.create(
        sdxl=SDXLRequest(prompt="a red kite", n=n, seed=SEED, width=64, height=64, steps=2, **sdxl),
        refine=None, best_of={"candidates": candidates, "criteria": "sharp", "model": "gemma"}).to_request()


def run_job(tmp_path, request: dict) -> tuple[JobContext, FakeSDXL]:
    store = JobStore(Storage(str(tmp_path / "root")))
    ctx = JobContext(store, store.create("images.generations", request, stages=["generate", "judge"]))
    sdxl = FakeSDXL()
    image_generation(ctx, {"sdxl": sdxl, "llm": object()})
    return ctx, sdxl


# --- the job: generate → judge, ranked ------------------------------------------------------------------


def test_the_top_n_follow_the_scores_and_every_candidate_stays_in_the_record(tmp_path, judge):
    ctx, sdxl = run_job(tmp_path, best_of_request(4, 2))
    assert [(r.n, r.seed, r.store) for r in sdxl.requests] == [(4, SEED, False)]  # one SDXL call of 4
    assert judge.calls == [{"images": 4, "prompt": "a red kite", "model": "gemma", "criteria": "sharp"}]
    record = ctx.record
    # scores 3, 9, 9, 5: candidates 1 and 2 (the tie goes to the lower index), in that order
    assert [o.seed for o in record.outputs] == [SEED + 1, SEED + 2]
    assert [o.extra["judgement"]["score"] for o in record.outputs] == [9, 9]
    assert [o.extra["candidate"] for o in record.outputs] == [1, 2]
    assert record.outputs[0].extra["judgement"]["reasons"] == ["grey 1"]
    storage = ctx.store.storage
    assert [level_of(storage.get_bytes(o.key)) for o in record.outputs] == [1, 2]  # the stored PNGs are those
    best_of = record.result["best_of"]
    assert best_of["ranking"] == [1, 2, 3, 0] and best_of["n"] == 2 and best_of["candidates"] == 4
    judged = best_of["judged"]
    assert [c["score"] for c in judged] == [3, 9, 9, 5]
    assert [c["rank"] for c in judged] == [3, 0, 1, 2]
    assert [c["chosen"] for c in judged] == [False, True, True, False]
    # the two not returned are stored too, and named in the record
    for candidate in judged:
        assert level_of(storage.get_bytes(candidate["key"])) == candidate["index"]
        assert candidate["seed"] == SEED + candidate["index"]
    assert record.result["seeds"] == [SEED + i for i in range(4)]
    assert "judge" in record.stages and record.stage == "judge"


def test_a_count_that_is_no_batch_size_is_split_and_ranked_over_all_calls(tmp_path, judge):
    assert candidate_batches(6) == [4, 2] and candidate_batches(7) == [4, 2, 1] and candidate_batches(8) == [8]
    ctx, sdxl = run_job(tmp_path, best_of_request(6, 1))
    assert sorted((r.n, r.seed) for r in sdxl.requests) == [(2, SEED + 4), (4, SEED)]  # candidate i: seed + i
    assert judge.calls[0]["images"] == 6
    assert [o.seed for o in ctx.record.outputs] == [SEED + 5]  # score 10
    assert ctx.record.result["best_of"]["ranking"] == [5, 1, 2, 3, 0, 4]
    keys = [c["key"] for c in ctx.record.result["best_of"]["judged"]]
    assert len(set(keys)) == 6 and all(ctx.record.id in key for key in keys)  # the job's own files, no clash


def test_a_job_without_best_of_runs_as_before(tmp_path, judge):
    request = ImageGenerationPayload.create(sdxl=SDXLRequest(prompt="a kite", n=2, seed=5), refine=None).to_request()
    store = JobStore(Storage(str(tmp_path / "root")))
    ctx = JobContext(store, store.create("images.generations", request, stages=["generate"]))
    sdxl = FakeSDXL(store.storage)
    image_generation(ctx, {"sdxl": sdxl})
    assert [r.store for r in sdxl.requests] == [True] and judge.calls == []
    assert [o.seed for o in ctx.record.outputs] == [5, 6] and "best_of" not in ctx.record.result
    assert "best_of" not in request


# --- the API ---------------------------------------------------------------------------------------------


class RunningQueue:
    """The job queue, with a runner: each job is run by the real pipeline on the fake handles, in a
    thread, as the job runner would."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.store: JobStore | None = None
        self.sdxl: FakeSDXL | None = None

    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        self.sent.append(kwargs["job_id"])
        threading.Thread(target=self.run, args=(kwargs["job_id"],), daemon=True).start()

    def run(self, job_id: str) -> None:
        ctx = JobContext(self.store, self.store.get(job_id))
        ctx.save(status="in_progress")
        try:
            image_generation(ctx, {"sdxl": self.sdxl, "llm": object()})
            ctx.save(status="completed", progress=100.0)
        except Exception as exc:  # noqa: BLE001 - recorded as the job runner records it
            from storage.jobs import JobError

            ctx.save(status="failed", error=JobError(type=getattr(exc, "error_type", "server_error"),
                                                     message=str(exc)))


def build(tmp_path, llm: bool = True, max_best_of: int = 4) -> SimpleNamespace:
    sections: dict[str, Any] = {
        "sdxl": {"model": "models/tiny/sdxl", "default_size": 64, "min_size": 32, "max_size": 256,
                 "default_steps": 2, "max_steps": 50}}
    if llm:
        sections["llm"] = {"model_source": "models/tiny/gemma", "max_model_len": 2048}
    args = AtelierArgs.model_validate({
        "storage_root": str(tmp_path / "root"), "queue": {"broker_url": "memory://", "backend_url": "cache+memory://"},
        "ingress": {"max_best_of": max_best_of}, **sections})
    limits = model_limits(args)
    queue = RunningQueue()
    services = build_services(args.ingress, {name: object() for name in limits}, limits, queue=queue)
    queue.store, queue.sdxl = services.jobs.jobs, FakeSDXL()
    services.jobs.sse_poll_s = 0.02
    client = TestClient(create_app(services), base_url=LOCAL, raise_server_exceptions=False)
    return SimpleNamespace(client=client, services=services, queue=queue)


def generate(app, **body: Any):
    return app.client.post("/v1/images/generations", json={"prompt": "a red kite", "size": "64x64", **body})


def test_sync_best_of_returns_the_top_n_ranked_with_their_judgements(tmp_path, judge):
    app = build(tmp_path)
    response = generate(app, n=2, best_of=4, seed=SEED, response_format="b64_json", criteria="sharp")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["score"] for item in body["data"]] == [9, 9]
    assert [item["seed"] for item in body["data"]] == [SEED + 1, SEED + 2]
    assert [level_of(base64.b64decode(item["b64_json"])) for item in body["data"]] == [1, 2]
    first = body["data"][0]
    assert first["reasons"] == ["grey 1"] and first["defects"] == [] and first["matches_prompt"] is True
    assert judge.calls[0]["criteria"] == "sharp" and judge.calls[0]["model"] == "gemma"
    # the job it ran keeps every candidate
    job = app.client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "completed" and job["stages"] == ["generate", "judge"]
    assert [c["score"] for c in job["result"]["best_of"]["judged"]] == [3, 9, 9, 5]
    assert job["params"]["best_of"]["candidates"] == 4


def test_url_answers_and_async_jobs_carry_the_same_ranking(tmp_path, judge):
    app = build(tmp_path)
    body = generate(app, n=1, best_of=4, seed=SEED).json()
    assert len(body["data"]) == 1 and body["data"][0]["score"] == 9
    assert body["data"][0]["url"].startswith(f"{LOCAL}/v1/files/outputs/")
    png = app.client.get(body["data"][0]["url"][len(LOCAL):])
    assert png.status_code == 200 and level_of(png.content) == 1

    accepted = app.client.post("/v1/images/generations?async=true",
                               json={"prompt": "a red kite", "size": "64x64", "best_of": 4, "seed": SEED})
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    job = app.services.jobs.jobs.get(job_id)
    for _ in range(500):
        if job.status == "completed":
            break
        threading.Event().wait(0.02)
        job = app.services.jobs.jobs.get(job_id)
    assert [o.extra["judgement"]["score"] for o in job.outputs] == [9]


def test_an_unpinned_seed_is_pinned_so_every_candidate_is_reproducible(tmp_path, judge):
    app = build(tmp_path)
    accepted = app.client.post("/v1/images/generations?async=true",
                               json={"prompt": "a red kite", "size": "64x64", "best_of": 3})
    record = app.services.jobs.jobs.get(accepted.json()["id"])
    assert record.request["sdxl"]["seed"] is not None and record.request["best_of"]["candidates"] == 3


@pytest.mark.parametrize("body, status, param, words", [
    ({"n": 2, "best_of": 1}, 400, "best_of", "at least n (2)"),
    ({"best_of": 5}, 400, "best_of", "at most 4"),
    ({"criteria": "sharp"}, 400, "criteria", "give best_of"),
    ({"best_of": 2, "upscale": True}, 400, "best_of", "upscale"),
    ({"best_of": 2, "criteria": "x" * 1001}, 400, "criteria", "at most 1000 characters"),
    ({"best_of": 0}, 400, "best_of", "greater than or equal to 1"),
    ({"best_of": 2, "seed": 2**32 - 1}, 400, "seed", "seed"),
])
def test_bad_best_of_is_a_400_naming_the_field(tmp_path, judge, body, status, param, words):
    app = build(tmp_path)
    response = generate(app, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert app.queue.sent == []  # nothing was run


def test_best_of_without_a_language_model_is_a_404_naming_best_of(tmp_path, judge):
    app = build(tmp_path, llm=False)
    response = generate(app, best_of=2)
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "best_of"
    assert "language model" in response.json()["error"]["message"]
    assert generate(app, n=2, best_of=1).json()["error"]["param"] == "best_of"  # the bounds are checked first


def test_a_failed_judge_fails_the_sync_answer_with_its_reason(tmp_path, monkeypatch):
    from deployments.llm.vision import VisionOutputError

    def broken(*args, **kwargs):
        raise VisionOutputError("the language model's judgement was cut off at max_tokens")

    monkeypatch.setattr(graph_vision, "judge_images", broken)
    app = build(tmp_path)
    response = generate(app, best_of=2, seed=SEED)
    assert response.status_code == 500
    assert "cut off at max_tokens" in response.json()["error"]["message"]


# --- the workflow node: text_to_image with best_of ---------------------------------------------------------


def test_the_text_to_image_node_with_best_of_ranks_the_same_way(tmp_path, judge):
    from graphs.payloads import parse_payload
    from graphs.workflow_jobs import node_runners
    from graphs.workflows import Node, NodeContext, TextToImageParams

    storage = Storage(str(tmp_path / "root"))
    spec = parse_payload("workflows.run", {"workflow": {"nodes": []}, "judge": {"model": "gemma"}})
    sdxl = FakeSDXL()
    runners = node_runners({"sdxl": sdxl, "llm": object()}, "job_7", spec, storage)
    reported: dict = {}
    params = TextToImageParams(n=2, best_of=4, seed=SEED, criteria="sharp")
    ctx = NodeContext(Node(id="gen", type="text_to_image", params=params.model_dump()), params,
                      {"prompt": "a red kite"}, lambda f: None, lambda: None, reported.update)
    out = runners["text_to_image"](ctx)
    assert [level_of(storage.get_bytes(key)) for key in out["images"]] == [1, 2]
    assert [c["score"] for c in reported["candidates"]] == [3, 9, 9, 5]
    assert [c["chosen"] for c in reported["candidates"]] == [False, True, True, False]
    assert all(c["image"].startswith("outputs/") and "job_7.gen" in c["image"] for c in reported["candidates"])
    assert judge.calls[0]["criteria"] == "sharp"


def test_the_images_api_and_the_workflow_node_refuse_best_of_with_the_same_message(tmp_path, judge):
    import asyncio

    app = build(tmp_path)
    doc = {"nodes": [{"id": "p", "type": "prompt", "params": {"text": "a kite"}},
                     {"id": "t", "type": "text_to_image", "params": {"n": 2, "best_of": 5, "seed": 1}},
                     {"id": "o", "type": "output", "params": {}}],
           "edges": [{"source": "p", "source_port": "text", "target": "t", "target_port": "prompt"},
                     {"source": "t", "source_port": "images", "target": "o", "target_port": "value"}]}
    report, _ = asyncio.run(app.services.workflows.check(doc))
    api_error = generate(app, n=2, best_of=5).json()["error"]
    assert [(e.node, e.field, e.message) for e in report.errors] == [("t", "params.best_of", api_error["message"])]
    doc["nodes"][1]["params"]["best_of"] = 1
    report, _ = asyncio.run(app.services.workflows.check(doc))
    assert [(e.field, e.message) for e in report.errors] == [("params.best_of", generate(app, n=2, best_of=1).json()["error"]["message"])]
    # through the HTTP validate endpoint as well
    validated = app.client.post("/v1/workflows/validate", json=doc).json()
    assert validated["valid"] is False and validated["errors"][0]["field"] == "params.best_of"
