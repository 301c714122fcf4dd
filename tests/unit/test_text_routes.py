"""The text routes of an app without a language model: the same paths answer 404 model_not_found,
and the ingress never imports vLLM (nor, through it, torch and transformers) to say so."""

from __future__ import annotations

import subprocess
import sys

from tests.keyed_app import REPO, keyed_app

KEY = "sk-text-routes-test-key-000000000000"


def test_chat_and_completions_without_a_language_model_are_a_404_naming_model(tmp_path):
    app = keyed_app(tmp_path, {"alice": (KEY, ["generate"])})
    auth = {"Authorization": f"Bearer {KEY}"}
    for path, body in [("/v1/chat/completions", {"model": "gemma", "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})]:
        answer = app.client.post(path, json=body, headers=auth)
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == {"type": "model_not_found", "param": "model",
                                          "message": "no language model is deployed in this application"}
    not_json = app.client.post("/v1/chat/completions", content=b"{", headers={**auth, "Content-Type": "application/json"})
    assert (not_json.status_code, not_json.json()["error"]["param"]) == (400, "body")
    form = app.client.post("/v1/completions", content=b"a=1", headers={**auth, "Content-Type": "text/plain"})
    assert form.status_code == 415
    assert app.client.post("/v1/completions", json={"prompt": "hi"}).status_code == 401


def test_an_app_without_a_language_model_never_imports_vllm(tmp_path):
    heavy = ("vllm", "torch", "transformers")
    code = f"""
import sys
from pathlib import Path
import api.app, api.ingress
print(sorted(m for m in {heavy!r} if m in sys.modules))
from tests.keyed_app import keyed_app  # the test harness builds tiny models with torch
app = keyed_app(Path({str(tmp_path)!r}), {{}})
assert app.client.post("/v1/completions", json={{"prompt": "hi"}}).status_code == 401
paths = app.client.app.openapi()["paths"]
assert "/v1/chat/completions" in paths and "/v1/prompts/refine" in paths
print("vllm" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-2:] == ["[]", "False"]


def test_an_app_built_without_services_documents_the_typed_text_routes():
    from api.ingress import create_app

    schema = create_app().openapi()
    body = schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ChatCompletionRequest")
    assert "messages" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
