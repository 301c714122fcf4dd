"""API keys on the ingress's FastAPI app: every route in the OpenAPI spec refuses a missing key
(401) and a key of the wrong scope (403); /healthz stays open."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from deployments.auth import ApiKey, AuthConfig, find_key, hash_key, main, required_scope
from deployments.ingress import app

KEYS = {"reader": ("read-key", ["read"]), "maker": ("make-key", ["generate"]), "trainer": ("train-key", ["train"]),
        "root": ("root-key", ["admin"])}


@pytest.fixture()
def client():
    previous = app.state.api_keys
    app.state.api_keys = [ApiKey(name=n, sha256=hash_key(k), scopes=s) for n, (k, s) in KEYS.items()]
    yield TestClient(app, raise_server_exceptions=False)
    app.state.api_keys = previous


def routes() -> list[tuple[str, str]]:
    out = []
    for path, methods in app.openapi()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        out += [(method.upper(), concrete) for method in methods]
    return out


def test_the_spec_has_the_routes_of_every_area():
    paths = {path for _, path in routes()}
    for expected in ("/v1/images/generations", "/v1/videos", "/v1/chat/completions", "/v1/datasets",
                     "/v1/fine_tuning/jobs", "/v1/workflows/runs", "/v1/jobs/x/replay"):
        assert expected in paths


def test_every_route_but_healthz_refuses_a_missing_or_unknown_key(client):
    checked = 0
    for method, path in routes():
        if path == "/healthz":
            continue
        for headers in ({}, {"Authorization": "Bearer not-a-key"}, {"Authorization": "Basic cmVhZC1rZXk="}):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert set(response.json()["error"]) == {"type", "message", "param"}
            checked += 1
    assert checked >= 3 * 30
    # past the check the handler runs, which needs a Serve replica: anything but 401/403 means it let it through
    assert client.get("/healthz").status_code not in (401, 403)


def test_every_route_refuses_a_key_of_the_wrong_scope(client):
    refused = 0
    for method, path in routes():
        needed = required_scope(method, path)
        wrong = {"read": None, "generate": "train-key", "train": "make-key"}[needed]
        if method in ("GET", "HEAD"):
            wrong = None
        for key in ([wrong] if wrong else []) + ([] if needed == "read" else ["read-key"]):
            response = client.request(method, path, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 403, (method, path, key, response.text)
            error = response.json()["error"]
            assert error["type"] == "permission_error" and needed in error["message"]
            refused += 1
    assert refused >= 20


def test_a_key_with_the_scope_passes_the_check(client):
    # Past the check the route's handler runs, which needs a Serve replica (tests/serve has the
    # real thing): here anything but 401/403 shows the key was accepted.
    for method, path, key in [("POST", "/v1/images/generations", "make-key"), ("POST", "/v1/images/generations",
                               "root-key"), ("POST", "/v1/fine_tuning/jobs", "train-key"),
                              ("GET", "/v1/jobs", "read-key"), ("GET", "/v1/datasets", "make-key")]:
        response = client.request(method, path, json={}, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code not in (401, 403), (method, path, key, response.text)


def test_keys_from_the_environment_and_the_key_tool(monkeypatch, capsys):
    monkeypatch.setenv("ATELIER_API_KEYS", f'[{{"name": "ops", "sha256": "{hash_key("s3cret")}", "scopes": ["admin"]}}]')
    keys = AuthConfig(keys=[ApiKey(name="a", sha256=hash_key("k"), scopes=["read"])]).resolved_keys()
    assert [k.name for k in keys] == ["a", "ops"]
    assert find_key(keys, "s3cret").name == "ops" and find_key(keys, "s3cre") is None
    assert main(["new-key", "--name", "ci", "--scopes", "generate,train"]) == 0
    printed = capsys.readouterr().out
    key = printed.split("key (shown once): ", 1)[1].split()[0]
    assert hash_key(key) in printed and key.startswith("atl-")
