"""Gemma config -> LLMConfig, refinement request and the never-failing parse (no Ray, no engine)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from deployments.styles import load_styles
from deployments.llm.contract import (
    GemmaConfig,
    RefineRequest,
    RefineSettings,
    build_refine_chat,
    engine_error,
    parse_refined,
    refine_schema,
)


def test_llm_config_carries_engine_and_structured_output_settings():
    config = GemmaConfig(model_source="google/gemma-2-2b-it", max_model_len=4096,
                         engine_kwargs={"gpu_memory_utilization": 0.18},
                         placement_group_config={"bundles": [{"GPU": 0.2}]})
    llm = config.llm_config()
    assert llm.model_id == "gemma"
    assert llm.engine_kwargs["max_model_len"] == 4096
    assert llm.engine_kwargs["gpu_memory_utilization"] == 0.18
    assert llm.engine_kwargs["structured_outputs_config"]["backend"] == "xgrammar"
    assert llm.placement_group_config["bundles"] == [{"GPU": 0.2}]


@pytest.mark.parametrize("interval_ms", [0, 50])
def test_stream_batching_interval_reaches_experimental_configs(interval_ms):
    llm = GemmaConfig(model_source="m", stream_batching_interval_ms=interval_ms).llm_config()
    assert llm.experimental_configs["stream_batching_interval_ms"] == interval_ms


def test_stream_batching_interval_none_keeps_rays_default():
    llm = GemmaConfig(model_source="m", stream_batching_interval_ms=None).llm_config()
    assert "stream_batching_interval_ms" not in llm.experimental_configs


def test_stream_batching_interval_is_not_negative():
    with pytest.raises(ValueError):
        GemmaConfig(model_source="m", stream_batching_interval_ms=-1)


def test_refine_chat_asks_for_the_schema_with_style_and_trigger_word():
    settings = RefineSettings(max_prompt_chars=100, max_negative_chars=50)
    request = RefineRequest(prompt="a fox", seed=4)
    body = build_refine_chat(request, "gemma", settings, load_styles()["cinematic"], "sks")
    assert body["model"] == "gemma" and body["seed"] == 4
    assert body["response_format"]["json_schema"]["schema"] == refine_schema(settings)
    user = body["messages"][-1]["content"]
    assert "a fox" in user and "'sks'" in user and "cinematic" in user.lower()


def test_parse_refined_accepts_schema_json_and_cleans_control_characters():
    text = json.dumps({"prompt": "a fox\x0b in  snow", "negative_prompt": "blur"})
    refined = parse_refined(text, RefineRequest(prompt="fox"), model="gemma")
    assert refined.refined and refined.warning is None
    assert refined.prompt == "a fox in snow"
    assert refined.negative_prompt == "blur"


@pytest.mark.parametrize("text, finish_reason, why", [
    ('{"prompt": "cut off', "length", "max_tokens"),
    ("not json", "stop", "not valid JSON"),
    ("[1, 2]", "stop", "not a JSON object"),
    ('{"prompt": "\\u0007 ", "negative_prompt": ""}', "stop", "empty prompt"),
    (None, "stop", "not valid JSON"),
])
def test_parse_refined_falls_back_with_a_warning(text, finish_reason, why):
    refined = parse_refined(text, RefineRequest(prompt="a fox"), finish_reason=finish_reason)
    assert refined.refined is False
    assert refined.prompt == "a fox"
    assert why in refined.warning


def test_trigger_word_is_kept_in_refined_and_fallback_prompts():
    ok = parse_refined('{"prompt": "a dog", "negative_prompt": ""}', RefineRequest(prompt="x"), trigger_word="sks")
    assert ok.prompt == "sks, a dog"
    fallback = parse_refined("nope", RefineRequest(prompt="a dog"), trigger_word="sks")
    assert fallback.prompt == "sks, a dog"


def test_engine_errors_name_a_request_field():
    def error(message, param=None, code=400):
        return SimpleNamespace(error=SimpleNamespace(message=message, param=param, code=code, type="BadRequestError"))

    assert engine_error(error("too long", "input_tokens"), "messages").param == "messages"
    # vLLM's character pre-check of the prompt (renderers/params.py `_text_len_check`)
    too_many_chars = error("This model's maximum context length is 512 tokens. However, your prompt contains "
                           "20000 characters (more than 7665 characters, which is the upper bound for 511 input "
                           "tokens). Please reduce the length of the input prompt. (parameter=input_text, "
                           "value=20000)", "input_text")
    assert engine_error(too_many_chars, "prompt").param == "prompt"
    assert engine_error(too_many_chars, "messages").param == "messages"
    assert engine_error(too_many_chars, "messages").status_code == 400
    assert engine_error(error("max_tokens is too large"), "prompt").param == "max_tokens"
    assert engine_error(error("bad temperature", "temperature"), "prompt").param == "temperature"
    server = engine_error(error("engine died", None, 500), "prompt")
    assert server.status_code == 500 and server.param is None
