"""Schemathesis over every route of the live OpenAPI: no 5xx, every error in the one shape, every
response as documented. The small version of `benchmarks/fuzz_api.py` (same checks, same code),
with a few examples per route and a fixed seed so a failure reproduces.

Nothing is excluded: generating routes are sent with `async=true` and their jobs cancelled at
once (the input checks are those of a synchronous call), LLM budgets are capped (n ≤ 2,
max_tokens ≤ 64 when within the context), anything created is deleted, and a DELETE only goes to
a path that does not exist. `ATELIER_FUZZ_EXAMPLES` / `ATELIER_FUZZ_SEED` change the size and seed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.serve

EXAMPLES = int(os.environ.get("ATELIER_FUZZ_EXAMPLES", "10"))
SEED = int(os.environ.get("ATELIER_FUZZ_SEED", "20261122"))


def _load_fuzz_api():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_api.py"
    spec = importlib.util.spec_from_file_location("atelier_fuzz_api", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


fuzz_api = _load_fuzz_api()


def test_every_route_survives_fuzzing(atelier):
    reports = fuzz_api.fuzz(atelier.base_url, max_examples=EXAMPLES, seed=SEED, timeout_s=120)
    paths = requests.get(f"{atelier.base_url}/openapi.json", timeout=30).json()["paths"]
    operations = sum(len(ops) for ops in paths.values())
    assert len(reports) == operations  # every documented route was fuzzed
    assert sum(r.calls for r in reports) >= operations
    assert any(code >= 400 for r in reports for code in r.statuses if isinstance(code, int))  # it did probe
    failures = [f"{r.label}: {'; '.join(f['problems'])[:400]}\n    {f['curl'][:600]}"
                for r in reports for f in r.failures]
    if failures:
        pytest.fail(f"{len(failures)} failing cases:\n" + "\n".join(failures[:20]), pytrace=False)


# --- what fuzzing found, pinned -----------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("route, body, param", [
    # vLLM's own validators raise an error pydantic does not wrap: these were 500s
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprob_token_ids": [1]}, "logprob_token_ids"),
    ("/v1/chat/completions", {"messages": [USER], "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [USER], "top_logprobs": -5}, "top_logprobs"),
    # lazily validated message parts: a bad one was a 500 when sent on to the LLM deployment
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": [{"type": "bogus"}]}, USER]},
     "messages.0.content.0.text"),
])
def test_llm_request_errors_found_by_fuzzing_are_400s(client, route, body, param):
    response = client.post(route, json={"model": "gemma", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_chat_with_an_empty_system_message_is_answered(client):
    # An empty list of parts was validated into an iterator that could not be pickled: a 500.
    response = client.post("/v1/chat/completions", json={
        "model": "gemma", "max_tokens": 2, "messages": [{"role": "system", "content": []}, USER]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_streamed_completion_is_documented_as_server_sent_events(client):
    response = client.post("/v1/completions", json={"model": "gemma", "prompt": "hi", "max_tokens": 2, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    documented = client.get("/openapi.json").json()["paths"]["/v1/completions"]["post"]["responses"]["200"]
    assert "text/event-stream" in documented["content"]


# --- the checks themselves can fail ------------------------------------------------------------------


def _response(status: int, body: bytes, headers: dict | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers.update({"content-type": "application/json", **(headers or {})})
    return response


@pytest.mark.parametrize("body, problem", [
    (b'{"error": {"type": "invalid_request_error", "message": "n: bad", "param": "n"}}', None),
    (b'{"error": {"type": "invalid_request_error", "message": "bad", "param": null}}', None),
    (b'{"detail": "Not Found"}', "no `error` object"),
    (b'{"error": {"type": "x", "message": "bad"}}', "lacks ['param']"),
    (b'{"error": {"type": "", "message": "bad", "param": null}}', "wrong types"),
    (b"Internal Server Error", "not JSON"),
])
def test_error_shape_check(body, problem):
    found = fuzz_api.error_shape_problem(_response(400, body))
    assert (found is None) if problem is None else (problem in found)


def test_only_a_designed_overload_503_is_tolerated():
    busy = b'{"error": {"type": "overloaded_error", "message": "busy", "param": null}}'
    assert fuzz_api.is_designed_overload(_response(503, busy, {"Retry-After": "1"}))
    assert not fuzz_api.is_designed_overload(_response(503, busy))  # no Retry-After
    crash = b'{"error": {"type": "server_error", "message": "boom", "param": null}}'
    assert not fuzz_api.is_designed_overload(_response(503, crash, {"Retry-After": "1"}))
    assert not fuzz_api.is_designed_overload(_response(500, busy, {"Retry-After": "1"}))
