"""Issue 18, findings 8 (the rest) and 9: per-key request and cost budgets (429 + Retry-After), a
cap on each owner's unfinished jobs, event streams with a lifetime and a per-key cap, a cap on the
images one workflow may ask for, and vLLM's extra request fields.

The budgets are counted by the `limits` library: in memory here, and in a real Redis (Debian's
redis-server, started by the test) to show that two ingress replicas spend from one budget.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

from api.auth import Caller, acting_as, reset_caller
from api.ratelimit import RateLimitConfig, RateLimitedError, RateLimiter
from deployments.errors import InvalidRequestError
from tests.keyed_app import keyed_app

KEYS = {"ann": ("ann-key", ["generate", "train"]), "ben": ("ben-key", ["generate", "train"]),
        "root": ("root-key", ["admin"])}


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


def retry_after(response) -> int:
    value = int(response.headers["Retry-After"])
    assert 1 <= value <= 3600
    return value


def test_a_key_over_its_request_budget_gets_429_with_retry_after(tmp_path):
    app = keyed_app(tmp_path, KEYS, {"rate_limits": {"requests": "3/minute"}})
    for _ in range(3):
        assert app.client.get("/v1/jobs", headers=bearer("ann")).status_code == 200
    refused = app.client.get("/v1/jobs", headers=bearer("ann"))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limit_exceeded" and "'ann'" in refused.json()["error"]["message"]
    assert retry_after(refused) <= 60
    # another key has its own budget; the probes need no key and count nothing
    assert app.client.get("/v1/jobs", headers=bearer("ben")).status_code == 200
    assert app.client.get("/healthz").status_code == 200


def test_open_mode_and_a_disabled_config_limit_nothing(tmp_path):
    app = keyed_app(tmp_path, {}, {"auth": {"mode": "open"}, "rate_limits": {"requests": "2/minute"}})
    app.client.app.state.api_keys = None  # open mode: no keys (the ingress passes None)
    assert all(app.client.get("/v1/jobs").status_code == 200 for _ in range(5))
    off = keyed_app(tmp_path / "off", KEYS, {"rate_limits": {"enabled": False, "requests": "1/minute"}})
    assert all(off.client.get("/v1/jobs", headers=bearer("ann")).status_code == 200 for _ in range(3))


def test_the_cost_budget_counts_images_times_steps(tmp_path):
    """64x64 images: n × steps units. Budget 100: 50 + 40 pass, the next 20 does not; a request
    over the whole budget is a 400 naming the field, and a refused request queues nothing."""
    app = keyed_app(tmp_path, KEYS, {"rate_limits": {"cost": "100/hour"}})

    def generate(who: str, n: int, steps: int):
        return app.client.post("/v1/images/generations?async=true", headers=bearer(who),
                               json={"prompt": "a kite", "n": n, "steps": steps, "size": "64x64"})

    assert generate("ann", 1, 50).status_code == 202
    assert generate("ann", 2, 20).status_code == 202
    sent = len(app.queue.sent)
    refused = generate("ann", 1, 20)
    assert refused.status_code == 429 and "cost budget" in refused.json()["error"]["message"], refused.text
    retry_after(refused)
    assert len(app.queue.sent) == sent
    assert generate("ben", 1, 20).status_code == 202  # ben's budget is his own
    too_big = generate("ben", 4, 50)  # 200 units > the whole budget of 100
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n", too_big.text


def test_video_and_workflow_requests_are_charged_too(tmp_path):
    app = keyed_app(tmp_path, KEYS, {"rate_limits": {"cost": "30/hour"}})
    video = {"prompt": "waves", "seconds": "1", "fps": 4, "steps": 5, "image_steps": 2}  # 4 frames x 5 steps = 20
    assert app.client.post("/v1/videos", headers=bearer("ann"), json=video).status_code in (200, 202)
    again = app.client.post("/v1/videos", headers=bearer("ann"), json=video)
    assert again.status_code == 429, again.text
    flow = {"nodes": [{"id": "p", "type": "prompt", "params": {"text": "x"}},
                      {"id": "t", "type": "text_to_image", "params": {"size": "64x64", "steps": 20, "n": 1}},
                      {"id": "o", "type": "output", "params": {"name": "o"}}],
            "edges": [{"source": "p", "source_port": "text", "target": "t", "target_port": "prompt"},
                      {"source": "t", "source_port": "images", "target": "o", "target_port": "value"}]}
    assert app.client.post("/v1/workflows/runs", headers=bearer("ben"), json={"workflow": flow}).status_code == 202
    refused = app.client.post("/v1/workflows/runs", headers=bearer("ben"), json={"workflow": flow})
    assert refused.status_code == 429, refused.text


def test_one_workflow_may_not_ask_for_more_images_than_the_cap(tmp_path):
    app = keyed_app(tmp_path, KEYS, {"max_workflow_images": 8})
    nodes = [{"id": "p", "type": "prompt", "params": {"text": "x"}}]
    edges = []
    for i in range(3):  # 3 nodes of n=4: 12 images > 8
        nodes += [{"id": f"t{i}", "type": "text_to_image", "params": {"size": "32x32", "steps": 2, "n": 4}},
                  {"id": f"o{i}", "type": "output", "params": {"name": f"o{i}"}}]
        edges += [{"source": "p", "source_port": "text", "target": f"t{i}", "target_port": "prompt"},
                  {"source": f"t{i}", "source_port": "images", "target": f"o{i}", "target_port": "value"}]
    refused = app.client.post("/v1/workflows/runs", headers=bearer("ann"), json={"workflow": {"nodes": nodes,
                                                                                             "edges": edges}})
    assert refused.status_code == 400 and "12 images" in refused.json()["error"]["message"], refused.text
    assert not app.queue.sent
    ok = app.client.post("/v1/workflows/runs", headers=bearer("ann"),
                         json={"workflow": {"nodes": nodes[:5], "edges": edges[:4]}})  # 8 images
    assert ok.status_code == 202, ok.text


def test_an_owner_has_at_most_max_active_jobs_unfinished(tmp_path):
    app = keyed_app(tmp_path, KEYS, {"rate_limits": {"max_active_jobs": 2}})

    def submit(who: str):
        return app.client.post("/v1/images/generations?async=true", headers=bearer(who),
                               json={"prompt": "a kite", "steps": 2, "size": "64x64"})

    first, second = submit("ann").json()["id"], submit("ann").json()["id"]
    refused = submit("ann")
    assert refused.status_code == 429 and "unfinished" in refused.json()["error"]["message"], refused.text
    retry_after(refused)
    assert submit("ben").status_code == 202 and submit("root").status_code == 202
    store = app.services.jobs.jobs
    store.update(first, status="completed", finished_at=time.time())  # one finishes: room again
    assert submit("ann").status_code == 202
    store.delete(second)  # deleted without finishing: its marker goes too
    assert submit("ann").status_code == 202
    assert submit("ann").status_code == 429


def test_event_streams_have_a_per_key_cap_and_a_lifetime(tmp_path):
    app = keyed_app(tmp_path, KEYS, {"sse_max_per_key": 2, "sse_max_lifetime_s": 0.3, "sse_poll_s": 0.05})
    jobs = app.services.jobs
    token = acting_as(Caller(owner="ann", key="ann"))
    try:
        closes = [jobs.open_stream(), jobs.open_stream()]
        with pytest.raises(RateLimitedError):
            jobs.open_stream()
        closes.pop()()
        closes.append(jobs.open_stream())  # a closed stream makes room
    finally:
        reset_caller(token)
    job = app.client.post("/v1/images/generations?async=true", headers=bearer("ben"),
                          json={"prompt": "a kite", "steps": 2, "size": "64x64"}).json()["id"]
    started = time.monotonic()
    with app.client.stream("GET", f"/v1/jobs/{job}/events", headers=bearer("ben")) as stream:
        text = "".join(stream.iter_text())
    assert time.monotonic() - started < 10
    assert "event: job" in text and "event: reconnect" in text and "retry: 1000" in text  # the lifetime ended it


def test_two_ingress_replicas_spend_from_one_budget_in_redis(tmp_path):
    """Two RateLimiters (as two ingress replicas build them) on one real Redis share a key's budget."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (make test installs Debian's)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                              "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        os.environ["ATELIER_TEST_REDIS_PORT"] = str(port)
        config = RateLimitConfig(storage_uri="redis://127.0.0.1:${ATELIER_TEST_REDIS_PORT}/0", requests="4/minute")
        one, two = RateLimiter(config), RateLimiter(config)
        one.request("ann")
        two.request("ann")
        one.request("ann")
        two.request("ann")
        with pytest.raises(RateLimitedError) as refused:
            one.request("ann")
        assert int(refused.value.headers["Retry-After"]) >= 1
        two.request("ben")  # ben's own budget
        token = acting_as(Caller(owner="ann", key="ann"))
        try:
            cost = RateLimiter(config.model_copy(update={"cost": "10/hour"}))
            cost.charge(6, "n")
            with pytest.raises(RateLimitedError):
                RateLimiter(config.model_copy(update={"cost": "10/hour"})).charge(6, "n")
            with pytest.raises(InvalidRequestError):
                cost.charge(11, "n")
        finally:
            reset_caller(token)
    finally:
        os.environ.pop("ATELIER_TEST_REDIS_PORT", None)
        redis.terminate()
        redis.wait(timeout=10)


@pytest.mark.parametrize("field, value", [("chat_template", "{{ 7*7 }}"), ("vllm_xargs", {"a": 1}),
                                          ("use_beam_search", True), ("prompt_logprobs", 5), ("priority", -10),
                                          ("top_logprobs", 20), ("mm_processor_kwargs", {"x": 1})])
def test_vllm_extras_that_reach_into_the_server_are_refused(field, value):
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from deployments.llm.contract import check_extras

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    with pytest.raises(InvalidRequestError) as refused:
        check_extras(ChatCompletionRequest.model_validate(body))
    assert refused.value.param == field
    check_extras(ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                       "logprobs": True, "top_logprobs": 3, "seed": 1}))
