"""The vision contract's structured answers, and the job-side helpers (graphs/vision.py) over a
fake LLM handle that answers with fixed JSON: what is sent (one image per request, as a data: URL,
under the judgement's or the verdict's schema) and what comes back parsed."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace

import pytest
from PIL import Image

from deployments.llm import vision
from deployments.llm.vision import (ContentPolicyError, JudgeSettings, ModerationSettings, VisionOutputError,
                                    parse_judgement, parse_moderation)
from graphs import vision as job_vision
from storage.fs import Storage
from tests.keyed_app import png


def answer(content: str, finish_reason: str = "stop") -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}]}


def images_of(request) -> list[bytes]:
    """The images a chat request carries, decoded from their data: URLs."""
    out = []
    for message in request.messages:
        content = message["content"]
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                assert url.startswith("data:image/png;base64,")
                out.append(base64.b64decode(url.split(",", 1)[1]))
    return out


class SyncLLM:
    """The LLM deployment as a job thread sees it: `.options(stream=True).chat.remote(request, None)`
    returns an iterable stream. `reply(request)` gives the answer's content."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        self.cancelled = 0

    def options(self, **_):
        return self

    @property
    def chat(self):
        return SimpleNamespace(remote=self._remote)

    def _remote(self, request, raw_request):
        from ray.serve.llm.openai_api_models import ChatCompletionResponse

        self.requests.append(request)
        response = ChatCompletionResponse.model_validate({
            "id": "chat-1", "created": 1, "model": request.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.reply(request)},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        llm = self

        class Stream(list):
            def cancel(self):
                llm.cancelled += 1

        return Stream([[response]])  # as Serve streams a batch: a list of items


def test_a_judgement_parses_and_a_broken_one_is_a_502():
    judged = parse_judgement(answer(json.dumps({"score": 8, "reasons": ["sharp", "on theme"], "defects": [],
                                                "matches_prompt": True})))
    assert (judged.score, judged.reasons, judged.defects, judged.matches_prompt) == (8, ["sharp", "on theme"], [],
                                                                                       True)
    with pytest.raises(VisionOutputError) as cut:
        parse_judgement(answer('{"score": 8, "reasons": ["sh', finish_reason="length"))
    assert cut.value.status_code == 502 and "max_tokens" in cut.value.message
    with pytest.raises(VisionOutputError):  # out of the schema's range
        parse_judgement(answer(json.dumps({"score": 11, "reasons": ["x"], "defects": [], "matches_prompt": True})))


def test_a_moderation_verdict_flags_only_a_configured_category():
    settings = ModerationSettings(enabled=True, categories={"gore": "graphic violence"})
    assert parse_moderation(answer('{"flagged": true, "category": "gore"}'), settings).category == "gore"
    # a category the policy does not have, or "none", is not a refusal
    assert not parse_moderation(answer('{"flagged": true, "category": "sexual"}'), settings).flagged
    assert not parse_moderation(answer('{"flagged": false, "category": "none"}'), settings).flagged
    schema = vision.build_prompt_moderation_chat("x", "gemma", settings)["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["category"]["enum"] == ["gore", "none"]


def test_judge_images_sends_one_image_per_request_and_parses_each_answer_in_order():
    scores = iter([3, 9, 6])
    llm = SyncLLM(lambda request: json.dumps({"score": next(scores), "reasons": ["r"], "defects": ["blur"],
                                              "matches_prompt": True}))
    images = [png(32, 32, seed) for seed in range(3)]
    settings = JudgeSettings(max_reasons=2)
    judged = job_vision.judge_images(llm, images, "a red fox", "gemma", settings, criteria="sharp fur")
    assert [j.score for j in judged] == [3, 9, 6] and judged[0].defects == ["blur"]
    assert vision.rank(judged) == [1, 2, 0]
    assert [images_of(r) for r in llm.requests] == [[image] for image in images]
    first = llm.requests[0]
    assert first.model == "gemma" and first.max_tokens == settings.max_tokens
    assert first.response_format.json_schema.name == "judgement"
    assert first.response_format.json_schema.json_schema["properties"]["reasons"]["maxItems"] == 2
    assert "a red fox" in first.messages[-1]["content"][-1]["text"] and "sharp fur" in first.messages[-1]["content"][-1]["text"]
    assert llm.cancelled == 3  # every stream is closed


def test_job_side_moderation_refuses_with_the_category_and_passes_otherwise():
    settings = ModerationSettings(enabled=True)
    llm = SyncLLM(lambda request: '{"flagged": true, "category": "hate"}'
                  if "forbidden" in str(request.messages[-1]["content"]) else '{"flagged": false, "category": "none"}')
    assert not job_vision.moderate_prompt(llm, "a calm lake", "gemma", settings).flagged
    with pytest.raises(ContentPolicyError) as refused:
        job_vision.moderate_prompt(llm, "a forbidden thing", "gemma", settings, param="nodes.idea.params.text")
    body = refused.value.to_body()["error"]
    assert body == {"type": "invalid_request_error", "code": "content_policy_violation", "category": "hate",
                    "param": "nodes.idea.params.text", "message": body["message"]}
    assert "hate" in body["message"]
    # off: nothing is asked
    asked = len(llm.requests)
    assert not job_vision.moderate_prompt(llm, "a forbidden thing", "gemma", ModerationSettings()).flagged
    assert len(llm.requests) == asked


class FakeJob:
    """What store_moderated and image_generation read of a JobContext."""

    def __init__(self, storage: Storage, request: dict):
        from graphs.payloads import parse_payload

        self.id = "job-mod1"
        self.store = SimpleNamespace(storage=storage)
        self.payload = parse_payload("images.generations", request)
        self.record = SimpleNamespace(kind="images.generations", result=None)
        self.outputs = []

    def start_stage(self, stage): ...

    def step(self, step, total): ...

    def check_cancelled(self): ...

    def add_output(self, output):
        self.outputs.append(output)


class FakeSDXL:
    """generate_stream: the response, with PNGs when the request does not store (the replica's rule)."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.requests = []

    def options(self, **_):
        return self

    @property
    def generate_stream(self):
        from deployments.sdxl.contract import SDXLImage, SDXLResponse
        from storage.keys import output_key

        def remote(request):
            self.requests.append(request)
            images = []
            for i in range(request.n):
                data = png(32, 32, 40 + i)
                image = SDXLImage(seed=5 + i, width=32, height=32)
                if request.store:
                    image.key = self.storage.put_bytes(output_key(request.output_id, i), data)
                else:
                    image.png = data
                images.append(image)
            return [SDXLResponse(model="sdxl", mode=request.mode, prompt=request.prompt, negative_prompt="",
                                 steps=2, guidance_scale=5.0, images=images, batch_images=request.n, elapsed_s=0.1)]

        return SimpleNamespace(remote=remote)


@pytest.mark.parametrize("flagged", [True, False])
def test_an_image_job_looks_at_each_image_before_storing_it(tmp_path, flagged):
    from graphs.pipelines import image_generation

    storage = Storage(str(tmp_path / "storage"))
    settings = ModerationSettings(enabled=True)
    ctx = FakeJob(storage, {"sdxl": {"prompt": "a pear", "n": 2, "seed": 5, "steps": 2},
                            "moderation": {"model": "gemma", "settings": settings.model_dump(mode="json")}})
    verdict = '{"flagged": true, "category": "violence_graphic"}' if flagged else '{"flagged": false, "category": "none"}'
    llm = SyncLLM(lambda request: verdict)
    sdxl = FakeSDXL(storage)
    if flagged:
        with pytest.raises(ContentPolicyError) as refused:
            image_generation(ctx, {"sdxl": sdxl, "llm": llm})
        assert refused.value.category == "violence_graphic"
        assert not storage.list("outputs/") and not ctx.outputs  # nothing refused is stored
    else:
        image_generation(ctx, {"sdxl": sdxl, "llm": llm})
        keys = [o.key for o in ctx.outputs]
        assert len(keys) == 2 and all(key.startswith("outputs/") and "/job-mod1/" in key for key in keys)
        for i, key in enumerate(keys):
            assert storage.get_bytes(key) == png(32, 32, 40 + i)
            assert Image.open(io.BytesIO(storage.get_bytes(key))).size == (32, 32)
    assert sdxl.requests[0].store is False  # the replica stored nothing itself
    assert [images_of(r) for r in llm.requests] == [[png(32, 32, 40)], [png(32, 32, 41)]]
