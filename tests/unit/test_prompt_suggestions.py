"""Issue 22, item 3 (suggestions): GET /v1/prompts/suggestions, autocomplete from the curated list
in configs/prompts.yaml and random prompts for inspiration (repeatable under a seed)."""

from __future__ import annotations

import pytest

from api.prompts.service import PromptsService
from tests.keyed_app import keyed_app

KEYS = {"reader": ("read-key", ["read"])}
HEADERS = {"Authorization": "Bearer read-key"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    return keyed_app(tmp_path_factory.mktemp("storage"), KEYS).client


def test_autocomplete_ranks_the_typed_words(client):
    found = client.get("/v1/prompts/suggestions", params={"q": "a red f"}, headers=HEADERS).json()["data"]
    assert found[0]["prompt"] == "a red fox curled up in fresh snow at dawn"
    words = client.get("/v1/prompts/suggestions", params={"q": "cat sun", "n": 5}, headers=HEADERS).json()["data"]
    assert [s["prompt"] for s in words] == ["an orange tabby cat sleeping in a sunbeam"]
    assert client.get("/v1/prompts/suggestions", params={"q": "zzzz"}, headers=HEADERS).json()["data"] == []
    many = client.get("/v1/prompts/suggestions", params={"q": "a", "n": 3}, headers=HEADERS).json()["data"]
    assert len(many) == 3 and all(s["prompt"].startswith("a") for s in many)


def test_random_prompts_are_distinct_styled_and_repeatable(client):
    def pick(seed):
        return client.get("/v1/prompts/suggestions", params={"n": 6, "seed": seed}, headers=HEADERS).json()["data"]

    first = pick(7)
    assert len({s["prompt"] for s in first}) == 6
    assert all(s["style"] in ("photographic", "cinematic", "anime", "digital-art", "line-art") for s in first)
    assert pick(7) == first and pick(8) != first


@pytest.mark.parametrize("params, param", [({"n": 0}, "n"), ({"n": 51}, "n"), ({"q": "x" * 201}, "q"),
                                           ({"seed": -1}, "seed")])
def test_bad_suggestion_queries_name_the_field(client, params, param):
    refused = client.get("/v1/prompts/suggestions", params=params, headers=HEADERS)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == param


def test_the_shipped_list_is_curated():
    service = PromptsService()
    assert len(service.prompts) >= 40 and len(set(service.prompts)) == len(service.prompts)
    assert all(0 < len(p) <= 120 for p in service.prompts)
