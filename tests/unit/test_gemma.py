"""Gemma config -> LLMConfig, refinement request and the never-failing parse (no Ray, no engine); and
the tiny Gemma 3 on vLLM's CPU build, offline, with an image (a child process, no Ray)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

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
    config = GemmaConfig(model_source="google/gemma-3-4b-it", max_model_len=4096,
                         engine_kwargs={"gpu_memory_utilization": 0.18, "limit_mm_per_prompt": {"image": 4}},
                         placement_group_config={"bundles": [{"GPU": 0.2}]})
    llm = config.llm_config()
    assert llm.model_loading_config.model_source == "google/gemma-3-4b-it"
    assert llm.engine_kwargs["limit_mm_per_prompt"] == {"image": 4}
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


# --- Gemma 3 on vLLM's CPU build, offline --------------------------------------------------------

PLUGIN_CHECK = r"""
import sys
from deployments.llm.vllm_plugin import STANDIN, register
register()
register()  # vLLM may load general plugins more than once
module = sys.modules.get(STANDIN)
print(module.Gemma3ImageProcessor.__name__ if module else "untouched")
"""


REPO = Path(__file__).resolve().parents[2]


def test_the_vllm_plugin_is_installed_and_stands_in_for_the_torchvision_image_processor(tmp_path):
    plugins = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert plugins["atelier"] == "deployments.llm.vllm_plugin:register"  # `make venv` installed it
    fake = tmp_path / "torchvision"  # a host with torchvision (GPU) keeps transformers' own module
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    printed = {}
    for host, path in (("cpu", str(REPO)), ("gpu", f"{tmp_path}{os.pathsep}{REPO}")):
        result = subprocess.run([sys.executable, "-c", PLUGIN_CHECK], env={**os.environ, "PYTHONPATH": path},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        printed[host] = result.stdout.split()[-1]
    if importlib.util.find_spec("torchvision") is None:  # this venv (CPU torch)
        assert printed["cpu"] == "Gemma3ImageProcessorPil"
    assert printed["gpu"] == "untouched"

# Run in a child process (vLLM's engine and its environment stay out of pytest's), with
# configs/local.yaml's engine settings and environment, so what it checks is what `make serve` runs.
VLLM_IMAGE_CHAT = r"""
import base64, io, json, sys
from PIL import Image
from vllm import LLM, SamplingParams

folder, max_model_len, engine_kwargs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])

def data_url(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

def chat(*images, text="Describe the image."):
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts + [{"type": "text", "text": text}]}]

llm = LLM(model=folder, max_model_len=max_model_len, seed=0, **engine_kwargs)
params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
red, noise = Image.new("RGB", (100, 80), (200, 10, 10)), Image.effect_noise((64, 64), 64).convert("RGB")
outputs = llm.chat([chat(red), chat(red), chat(noise), chat(red, noise)], params)
try:
    llm.chat(chat(*[red] * (engine_kwargs["limit_mm_per_prompt"]["image"] + 1)), params)
    refused = None
except Exception as error:
    refused = str(error)
print("RESULT " + json.dumps({
    "prompts": [o.prompt_token_ids for o in outputs],
    "tokens": [list(o.outputs[0].token_ids) for o in outputs],
    "texts": [o.outputs[0].text for o in outputs],
    "first_logprob": [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in outputs],
    "refused": refused,
}))
"""


@pytest.mark.timeout(600)
def test_vllm_cpu_serves_the_tiny_gemma3_an_image(tmp_path):
    """vLLM 0.32's gemma3_mm imports a torchvision image processor that the CPU venv cannot have; the
    plugin (deployments/llm/vllm_plugin.py, an entry point vLLM loads in each of its processes) swaps
    in the PIL one. Without it the engine fails: "Model architectures
    ['Gemma3ForConditionalGeneration'] failed to be inspected"."""
    from transformers import AutoTokenizer

    from local.tiny_models import build_tiny_gemma

    llm = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())["applications"][0]["args"]["llm"]
    folder = build_tiny_gemma(tmp_path / "gemma")
    env = {**os.environ, **llm["runtime_env"]["env_vars"], "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run(
        [sys.executable, "-c", VLLM_IMAGE_CHAT, str(folder), str(llm["max_model_len"]), json.dumps(llm["engine_kwargs"])],
        env=env, capture_output=True, text=True, timeout=540)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (result.stdout[-3000:], result.stderr[-6000:])
    out = json.loads(lines[-1][len("RESULT "):])

    tok = AutoTokenizer.from_pretrained(folder)
    bos, image = tok.bos_token_id, tok.convert_tokens_to_ids(tok.image_token)
    boi, eoi = tok.convert_tokens_to_ids(tok.boi_token), tok.convert_tokens_to_ids(tok.eoi_token)
    for prompt in out["prompts"]:
        assert prompt[0] == bos and prompt.count(bos) == 1  # the template's <bos>, not doubled
    one, two = out["prompts"][0], out["prompts"][3]
    assert one.count(image) == 16 and one.count(boi) == one.count(eoi) == 1
    assert two.count(image) == 32 and two.count(boi) == 2
    # Each image's soft tokens sit between its markers.
    start = one.index(boi)
    assert one[start + 1 : start + 17] == [image] * 16 and one[start + 17] == eoi
    assert all(len(tokens) == 8 for tokens in out["tokens"])
    assert out["tokens"][0] == out["tokens"][1]  # greedy: the same image, the same answer
    assert all(isinstance(text, str) for text in out["texts"])
    assert out["first_logprob"][0] != out["first_logprob"][2]  # the model sees which image it got
    # configs/local.yaml's limit_mm_per_prompt: one image more is refused.
    assert out["refused"] and "image" in out["refused"]
