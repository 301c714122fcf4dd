"""API keys on the ingress's FastAPI app: every route in the OpenAPI spec refuses a missing key
(401) and a key of the wrong scope (403); /healthz stays open. (Under a route prefix, the same:
tests/unit/test_security_http.py.)"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.auth import ApiKey, AuthConfig, AuthConfigError, find_key, hash_key, main
from api.ingress import create_app

app = create_app()  # the routes, middlewares and error handlers of the real app, without services
LOCAL = "http://127.0.0.1:8000"  # a host on the default allow-list (ingress.allowed_hosts)

KEYS = {"reader": ("read-key", ["read"]), "maker": ("make-key", ["generate"]), "trainer": ("train-key", ["train"]),
        "root": ("root-key", ["admin"])}


@pytest.fixture()
def client():
    keys = [ApiKey(name=n, sha256=hash_key(k), scopes=s) for n, (k, s) in KEYS.items()]
    return TestClient(create_app(api_keys=keys), base_url=LOCAL, raise_server_exceptions=False)


def expected_scopes(method: str, path: str) -> tuple[str, ...]:
    """The policy, written out here apart from the code's rules (RequireScope on each route): any
    one of these scopes lets the call through."""
    if method in ("GET", "HEAD"):
        return ("read",)
    if path.startswith(("/v1/datasets", "/v1/fine_tuning", "/v1/collect")) or (
            method == "DELETE" and path.startswith("/v1/models/")) or (method == "POST" and path == "/v1/models"):
        return ("train",)  # importing a LoRA, deleting a LoRA version: its owner's `train` key
    if re.fullmatch(r"/v1/jobs/x(/cancel|/replay|/asset)?", path):
        return ("generate", "train")  # and then the scope of the job's own kind (test_security_http.py)
    if path == "/v1/assets/retention":
        return ("generate", "train")  # and then admin (tests/unit/test_assets.py)
    return ("generate",)


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
        if path in ("/healthz", "/readyz"):  # probes: open, they carry no data
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
        needed = expected_scopes(method, path)
        wrong = [key for scope, key in (("generate", "train-key"), ("train", "make-key")) if needed == (scope,)]
        for key in wrong + ([] if needed == ("read",) else ["read-key"]):
            response = client.request(method, path, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 403, (method, path, key, response.text)
            error = response.json()["error"]
            assert error["type"] == "permission_error" and all(repr(n) in error["message"] for n in needed)
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


# --- fail closed ---------------------------------------------------------------------------------


def test_keys_mode_is_the_default_and_refuses_to_start_without_a_key(monkeypatch):
    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    assert AuthConfig().mode == "keys"
    for unset in (None, "", "[]"):  # never set, set empty, or an empty list all leave the app without keys
        if unset is not None:
            monkeypatch.setenv("ATELIER_API_KEYS", unset)
        with pytest.raises(AuthConfigError) as refused:
            AuthConfig().enforced_keys()
        assert "ATELIER_API_KEYS" in str(refused.value) and "mode: open" in str(refused.value)
    monkeypatch.setenv("ATELIER_API_KEYS", f'[{{"name": "ops", "sha256": "{hash_key("k")}", "scopes": ["admin"]}}]')
    assert [k.name for k in AuthConfig().enforced_keys()] == ["ops"]
    assert AuthConfig(mode="open").enforced_keys() is None


def test_an_ingress_without_keys_does_not_start(monkeypatch, tmp_path):
    """Serve shows the constructor's error in `serve status`; nothing else runs before the check."""
    from api.ingress import IngressDeployment

    monkeypatch.delenv("ATELIER_API_KEYS", raising=False)
    config = {"storage_root": str(tmp_path), "queue": {"broker_url": "memory://", "backend_url": "cache+memory://"}}
    cls = IngressDeployment.func_or_class  # serve.ingress makes its __init__ a coroutine
    with pytest.raises(AuthConfigError, match="no API key is configured"):
        asyncio.run(cls.__init__(cls.__new__(cls), config, sdxl=None, job_runner=None))


def test_with_no_keys_loaded_every_route_is_closed_and_only_open_mode_opens_them():
    closed = TestClient(create_app(api_keys=[]), base_url=LOCAL, raise_server_exceptions=False)  # no keys: closed
    assert closed.get("/v1/jobs").status_code == 401
    assert closed.post("/v1/fine_tuning/jobs", json={}).status_code == 401
    opened = TestClient(create_app(api_keys=None), base_url=LOCAL, raise_server_exceptions=False)  # open mode
    assert opened.get("/v1/jobs").status_code != 401


def test_the_configs_fail_closed_except_the_local_default():
    import yaml

    from api.config import IngressConfig

    root = Path(__file__).resolve().parents[2]
    production = yaml.safe_load((root / "serve_config.yaml").read_text())["applications"][0]
    local = yaml.safe_load((root / "configs" / "local.yaml").read_text())["applications"][0]
    assert IngressConfig.model_validate({"queue": production["args"]["queue"],
                                         **production["args"]["ingress"]}).auth.mode == "keys"
    assert production["runtime_env"]["env_vars"]["ATELIER_API_KEYS"] == "${ATELIER_API_KEYS}"
    assert IngressConfig.model_validate({"queue": local["args"]["queue"], **local["args"]["ingress"]}).auth.mode == "open"
