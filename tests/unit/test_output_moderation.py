"""Output moderation on every path that makes images (issue 19): text-to-image-hd, text-to-video's
still, and the workflow's text_to_image, image_to_image, inpaint, best-of and qa_loop nodes.

Each job here is the real pipeline over a real JobStore, with a fake SDXL replica (PNGs back when
the request does not store, as the replica does) and a fake LLM answering the moderation schema:
a refused image fails the job or node and is never stored, and nothing downstream (upscaler, SVD)
runs on it; an image that passes is stored after the check. The API side (tests/unit/
test_vision_api.py's app) checks that each of these jobs carries the `moderation` section.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
from PIL import Image

from deployments.llm.vision import ContentPolicyError, ModerationSettings
from deployments.sdxl.contract import SDXLImage, SDXLProgress, SDXLRequest, SDXLResponse
from deployments.svd.contract import SVDProgress, SVDResponse
from deployments.upscaler.contract import UpscaleProgress, UpscaleResponse
from graphs.job_runner import JobContext
from graphs.payloads import TextToImageHDPayload, TextToVideoPayload, parse_payload
from storage.fs import Storage
from storage.jobs import JobStore
from tests.keyed_app import png
from tests.unit.test_vision_api import FLAG_WORD, bearer, build, refused
from tests.unit.test_vision_contract import SyncLLM, images_of

SETTINGS = ModerationSettings(enabled=True)
MODERATION = {"model": "gemma", "settings": SETTINGS.model_dump(mode="json")}
FLAGGED = '{"flagged": true, "category": "violence_graphic"}'
CLEAN = '{"flagged": false, "category": "none"}'


class Stream(list):
    def cancel(self) -> None:
        pass


class Model:
    """`handle.options(stream=True).<method>.remote(request)`: progress, then `answer(request)`."""

    def __init__(self, method: str, progress, answer):
        self.requests: list = []

        def remote(request):
            self.requests.append(request)
            return Stream([progress(step=1, total_steps=1), answer(request)])

        setattr(self, method, SimpleNamespace(remote=remote))

    def options(self, **_):
        return self


def sdxl_model(storage: Storage) -> Model:
    """Image i of a call is png(32, 32, 40 + i); stored by the 'replica' only when the request asks."""
    def answer(request: SDXLRequest) -> SDXLResponse:
        images = []
        for i in range(request.n):
            image = SDXLImage(seed=5 + i, width=32, height=32)
            if request.store:
                image.key = storage.put_bytes(f"outputs/2026/01/01/{request.output_id}/{i}.png", png(32, 32, 40 + i))
            else:
                image.png = png(32, 32, 40 + i)
            images.append(image)
        return SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt, negative_prompt="", steps=2,
                            guidance_scale=5.0, images=images, batch_images=request.n, elapsed_s=0.01)

    return Model("generate_stream", SDXLProgress, answer)


def upscaler_model() -> Model:
    return Model("upscale_stream", UpscaleProgress, lambda q: UpscaleResponse(
        model="upscaler", media="image", key=f"outputs/{q.output_id}.png", width=128, height=128, tiles=1,
        seed=q.seed or 0, steps=2, noise_level=20, elapsed_s=0.01))


def svd_model() -> Model:
    return Model("generate_stream", SVDProgress, lambda q: SVDResponse(
        model="svd", video_key=f"outputs/{q.output_id}.mp4", poster_key=f"outputs/{q.output_id}.png",
        num_frames=4, fps=4, width=32, height=32, seed=q.seed or 0, steps=2, motion_bucket_id=127,
        noise_aug_strength=0.02, elapsed_s=0.01))


def verdicts(flag: bool) -> SyncLLM:
    return SyncLLM(lambda request: FLAGGED if flag else CLEAN)


def job(tmp_path, kind: str, payload, stages: list[str]) -> JobContext:
    store = JobStore(Storage(str(tmp_path / "root")))
    return JobContext(store, store.create(kind, payload.to_request(), stages=stages))


def outputs_stored(ctx: JobContext) -> list[str]:
    return ctx.store.storage.list("outputs/")


SDXL = SDXLRequest(mode="text_to_image", prompt="a pear", n=2, width=32, height=32, steps=2, seed=5)


@pytest.mark.parametrize("flag", [True, False])
def test_text_to_image_hd_looks_at_each_still_before_it_is_stored_or_upscaled(tmp_path, flag):
    from graphs.video_pipelines import text_to_image_hd

    ctx = job(tmp_path, "images.text_to_image_hd", TextToImageHDPayload.create(
        sdxl=SDXL, refine=None, upscale={"steps": None, "noise_level": None, "seed": None}, moderation=MODERATION),
        ["generate", "upscale"])
    storage = ctx.store.storage
    handles = {"sdxl": sdxl_model(storage), "upscaler": upscaler_model(), "llm": verdicts(flag)}
    if flag:
        with pytest.raises(ContentPolicyError) as refusal:
            text_to_image_hd(ctx, handles)
        assert refusal.value.category == "violence_graphic"
        assert outputs_stored(ctx) == [] and not handles["upscaler"].requests and not ctx.record.outputs
    else:
        text_to_image_hd(ctx, handles)
        stills = [q.image_key for q in handles["upscaler"].requests]
        assert len(stills) == 2 and all(ctx.id in key for key in stills)
        assert [storage.get_bytes(key) for key in stills] == [png(32, 32, 40), png(32, 32, 41)]
        assert [o.width for o in ctx.record.outputs] == [128, 128]
    assert handles["sdxl"].requests[0].store is False  # the replica stored nothing itself
    assert [images_of(r) for r in handles["llm"].requests] == [[png(32, 32, 40)], [png(32, 32, 41)]]


def test_text_to_image_hd_without_moderation_is_stored_by_the_replica_and_asks_nothing(tmp_path):
    from graphs.video_pipelines import text_to_image_hd

    ctx = job(tmp_path, "images.text_to_image_hd", TextToImageHDPayload.create(
        sdxl=SDXL, refine=None, upscale={"steps": None, "noise_level": None, "seed": None}), ["generate", "upscale"])
    handles = {"sdxl": sdxl_model(ctx.store.storage), "upscaler": upscaler_model(), "llm": verdicts(True)}
    text_to_image_hd(ctx, handles)
    assert handles["sdxl"].requests[0].store is True and not handles["llm"].requests
    assert len(ctx.record.outputs) == 2


@pytest.mark.parametrize("flag", [True, False])
def test_text_to_video_looks_at_its_still_before_animating_it(tmp_path, flag):
    from graphs.video_pipelines import text_to_video

    payload = TextToVideoPayload.create(
        model="svd", prompt="a pear", size="32x32", seconds="1", num_frames=4, fps=4, seed=5,
        sdxl=SDXL.model_copy(update={"n": 1}), refine=None, upscale=None,
        svd={"num_frames": 4, "fps": 4, "width": 32, "height": 32, "seed": 5, "image_key": None},
        moderation=MODERATION)
    ctx = job(tmp_path, "videos.text_to_video", payload, ["generate", "video"])
    handles = {"sdxl": sdxl_model(ctx.store.storage), "svd": svd_model(), "llm": verdicts(flag)}
    if flag:
        with pytest.raises(ContentPolicyError):
            text_to_video(ctx, handles)
        assert outputs_stored(ctx) == [] and not handles["svd"].requests
    else:
        text_to_video(ctx, handles)
        still, = [q.image_key for q in handles["svd"].requests]
        assert ctx.store.storage.get_bytes(still) == png(32, 32, 40)
        assert ctx.record.outputs[0].key.endswith(".mp4")
    assert [images_of(r) for r in handles["llm"].requests] == [[png(32, 32, 40)]]


# --- workflow nodes ----------------------------------------------------------------------------


def node_run(tmp_path, node_type: str, params: dict, inputs: dict, flag: bool, moderation: dict | None = MODERATION,
             judge_scores: list[int] | None = None):
    """One node of a run whose payload carries `moderation`, through the real runner of its type."""
    from graphs.workflow_jobs import node_runners
    from graphs.workflows import NODE_TYPES, Node, NodeContext

    storage = Storage(str(tmp_path / "root"))
    spec = parse_payload("workflows.run", {"workflow": {"nodes": []}, "judge": {"model": "gemma"},
                                           **({"moderation": moderation} if moderation else {})})
    judged = iter(judge_scores or [])

    def answer(request) -> str:
        schema = getattr(request.response_format, "json_schema", None)
        if schema is not None and schema.name == "judgement":
            return f'{{"score": {next(judged)}, "reasons": ["ok"], "defects": [], "matches_prompt": true}}'
        return FLAGGED if flag else CLEAN

    llm = SyncLLM(answer)
    sdxl = sdxl_model(storage)
    runners = node_runners({"sdxl": sdxl, "llm": llm}, "job_9", spec, storage)
    typed = NODE_TYPES[node_type].params.model_validate(params)
    ctx = NodeContext(Node(id="n", type=node_type, params=params), typed, inputs, lambda f: None, lambda: None,
                      lambda info: None)
    return runners[node_type], ctx, storage, sdxl, llm


def moderation_asked(llm: SyncLLM) -> int:
    return sum(1 for r in llm.requests if getattr(r.response_format, "json_schema", None).name == "moderation")


@pytest.mark.parametrize("node_type", ["text_to_image", "image_to_image", "inpaint"])
def test_a_refused_node_image_fails_the_node_and_is_never_stored(tmp_path, node_type):
    inputs = {"prompt": "a pear"}
    if node_type != "text_to_image":
        seeded = Storage(str(tmp_path / "root"))
        inputs["image"] = seeded.put_bytes("uploads/u1/image", png(32, 32, 1))
        if node_type == "inpaint":
            inputs["mask"] = seeded.put_bytes("uploads/u1/mask", png(32, 32, 2))
    run, ctx, storage, sdxl, llm = node_run(tmp_path, node_type, {"n": 2, "seed": 5, "size": "32x32"}, inputs, True)
    with pytest.raises(ContentPolicyError):
        run(ctx)
    assert storage.list("outputs/") == [] and sdxl.requests[0].store is False
    assert moderation_asked(llm) == 2


def test_node_images_that_pass_are_stored_under_the_node(tmp_path):
    run, ctx, storage, sdxl, llm = node_run(tmp_path, "text_to_image", {"n": 2, "seed": 5, "size": "32x32"},
                                            {"prompt": "a pear"}, False)
    out = run(ctx)
    assert [storage.get_bytes(key) for key in out["images"]] == [png(32, 32, 40), png(32, 32, 41)]
    assert all("job_9.n" in key for key in out["images"]) and moderation_asked(llm) == 2


def test_a_run_without_moderation_lets_the_replica_store_and_asks_nothing(tmp_path):
    run, ctx, storage, sdxl, llm = node_run(tmp_path, "text_to_image", {"n": 1, "seed": 5, "size": "32x32"},
                                            {"prompt": "a pear"}, True, moderation=None)
    out = run(ctx)
    assert sdxl.requests[0].store is True and not llm.requests and len(out["images"]) == 1


def test_best_of_candidates_and_qa_rounds_are_looked_at_before_they_are_stored(tmp_path):
    run, ctx, storage, sdxl, llm = node_run(tmp_path, "text_to_image",
                                            {"n": 1, "best_of": 2, "seed": 5, "size": "32x32"},
                                            {"prompt": "a pear"}, True, judge_scores=[3, 8])
    with pytest.raises(ContentPolicyError):
        run(ctx)
    assert storage.list("outputs/") == []
    run, ctx, storage, sdxl, llm = node_run(tmp_path / "qa", "qa_loop",
                                            {"max_rounds": 2, "threshold": 9, "seed": 5, "size": "32x32"},
                                            {"prompt": "a pear"}, True, judge_scores=[3, 8])
    with pytest.raises(ContentPolicyError):
        run(ctx)
    assert storage.list("outputs/") == [] and moderation_asked(llm) == 1  # the first round stops it


# --- the API: every image-making job carries the check -----------------------------------------


def test_every_image_making_job_carries_the_output_check(tmp_path):
    app = build(tmp_path, moderation={"enabled": True})
    client, jobs = app.client, app.services.jobs.jobs

    def payload(response) -> dict:
        assert response.status_code in (200, 202), response.text
        record = jobs.get(response.json()["id"])
        return {**record.request, "kind": record.kind}

    hd = payload(client.post("/v1/images/generations?async=true", headers=bearer("alice"),
                             json={"prompt": "a pear", "size": "64x64", "upscale": True}))
    assert hd["kind"] == "images.text_to_image_hd" and hd["moderation"]["model"] == "gemma"
    video = payload(client.post("/v1/videos", headers=bearer("alice"),
                                json={"prompt": "a pear", "seconds": "1", "fps": 4, "size": "64x64"}))
    assert video["kind"] == "videos.text_to_video" and video["moderation"]["settings"]["enabled"] is True
    made = {"nodes": [{"id": "idea", "type": "prompt", "params": {"text": "a pear"}},
                      {"id": "still", "type": "text_to_image", "params": {"size": "64x64", "steps": 2}},
                      {"id": "out", "type": "output", "params": {}}],
            "edges": [{"source": "idea", "source_port": "text", "target": "still", "target_port": "prompt"},
                      {"source": "still", "source_port": "images", "target": "out", "target_port": "value"}]}
    run = payload(client.post("/v1/workflows/runs", headers=bearer("alice"), json={"workflow": made}))
    assert run["moderation"]["model"] == "gemma"
    # a run that makes no image (a prompt straight out) carries none
    text_only = {"nodes": [made["nodes"][0], made["nodes"][2]],
                 "edges": [{"source": "idea", "source_port": "text", "target": "out", "target_port": "value"}]}
    assert "moderation" not in payload(client.post("/v1/workflows/runs", headers=bearer("alice"),
                                                   json={"workflow": text_only}))


def test_moderation_off_leaves_every_job_as_it_was(tmp_path):
    app = build(tmp_path)
    response = app.client.post("/v1/images/generations?async=true", headers=bearer("alice"),
                               json={"prompt": f"a {FLAG_WORD} pear", "size": "64x64", "upscale": True})
    assert response.status_code == 202, response.text
    assert "moderation" not in app.services.jobs.jobs.get(response.json()["id"]).request
    assert not app.llm.requests


def test_a_refused_hd_still_is_a_400_and_nothing_is_stored_or_upscaled(tmp_path):
    app = build(tmp_path, moderation={"enabled": True}, flag_images=True)
    upscaled = []
    app.services.upscale.models.handle = lambda name: app.sdxl if name == "sdxl" else SimpleNamespace(
        upscale=SimpleNamespace(remote=lambda request: upscaled.append(request)))
    response = app.client.post("/v1/images/generations", headers=bearer("alice"),
                               json={"prompt": "a pear", "size": "64x64", "n": 2, "upscale": True})
    refused(response)
    assert app.storage.list("outputs/") == [] and not upscaled
    assert app.sdxl.requests[0].store is False
    assert Image.open(io.BytesIO(images_of(app.llm.requests[1])[0])).size == (64, 64)
