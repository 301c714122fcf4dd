"""The language model's contract: its config, prompt refinement, its limits and their checks.

The deployment is Ray's LLMServer (vLLM engine, OpenAI protocol, streaming, LoRA multiplexing),
built in deployment.py from `GemmaConfig`; the chat and completion request types are vLLM's own.
What is Atelier's is here: `GemmaLimits` (the model's name and context length, from the config),
the checks the API runs against them (`check_max_tokens`, `check_n`, `check_messages`), and prompt refinement.

Prompt refinement asks the model for JSON that matches a schema (vLLM structured outputs), so
a well-behaved model always parses; whatever it returns, `parse_refined` never fails the caller:
unusable output falls back to the original prompt with a warning.

No torch or vLLM import here, and Ray LLM's only inside `llm_config()`: the API layer and the
jobs import this.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import AtelierError, InvalidRequestError
from deployments.llm.vision import JudgeSettings
from deployments.styles import Prompt, StylePreset


class RefineSettings(BaseModel):
    max_prompt_chars: int = Field(400, ge=16, description="Schema maxLength of the refined prompt.")
    max_negative_chars: int = Field(200, ge=0)
    max_tokens: int = Field(512, ge=16)
    temperature: float = Field(0.7, ge=0)


class GemmaConfig(BaseModel):
    """What ops set in the `llm:` args; everything else is `ray.serve.llm.LLMConfig`'s."""

    model_id: str = Field("gemma", description="The name clients pass as `model`.")
    model_source: str = Field(description="Folder or hub id, e.g. google/gemma-3-4b-it (Gemma 3, which sees images).")
    max_model_len: int = Field(8192, ge=16)
    max_n: int = Field(8, ge=1, le=128, description="The most choices one request may ask for (`n`, and vLLM's "
                                                   "`best_of`); each is a whole generation. vLLM alone allows 16384.")
    engine_kwargs: dict[str, Any] = Field({}, description="vLLM engine arguments (dtype, gpu_memory_utilization, ...).")
    deployment_config: dict[str, Any] = Field({}, description="Ray Serve options: autoscaling, ray_actor_options.")
    placement_group_config: dict[str, Any] | None = Field(
        None, description="Resource bundles for the engine; on CPU give one, e.g. {bundles: [{CPU: 0.5}]}.")
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None
    stream_batching_interval_ms: float | None = Field(
        10, ge=0,
        description="A streamed answer sends its first chunk at once, then at most one message per this "
                    "interval times the streams in flight on the replica (up to stream_batching_max_interval_ms), "
                    "holding what arrived meanwhile (deployments/llm/server.py): the replica sends about "
                    "1000 / interval messages a second in all. 0 sends each chunk as its own message; None "
                    "keeps Ray's Batcher, whose first chunk waits 50 ms.")
    stream_batching_max_interval_ms: float = Field(
        100, gt=0, description="The longest a streamed answer waits between messages however many streams share "
                               "the replica (a chat UI stays smooth at 10 messages a second).")
    refine: RefineSettings = RefineSettings()
    judge: JudgeSettings = Field(JudgeSettings(), description="Bounds of a judgement (POST /v1/images/judge, best-of-n).")
    max_images: int = Field(4, ge=0, le=64, description="Image parts one chat request may carry (POST "
                                                        "/v1/chat/completions); the engine's limit_mm_per_prompt "
                                                        "must allow as many.")

    def llm_config(self):
        from ray.serve.llm import LLMConfig

        engine_kwargs = {
            "max_model_len": self.max_model_len,
            # Compact JSON keeps refinement inside its token budget.
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
            **self.engine_kwargs,
        }
        options: dict[str, Any] = {
            "model_loading_config": {"model_id": self.model_id, "model_source": self.model_source},
            "engine_kwargs": engine_kwargs,
            "deployment_config": self.deployment_config,
        }
        for name in ("placement_group_config", "accelerator_type", "runtime_env"):
            if getattr(self, name) is not None:
                options[name] = getattr(self, name)
        if self.stream_batching_interval_ms is not None:
            # Read by LLMServer._get_batch_interval_ms; its Batcher streams each chunk as it comes at 0.
            options["experimental_configs"] = {"stream_batching_interval_ms": self.stream_batching_interval_ms,
                                               "stream_batching_max_interval_ms": self.stream_batching_max_interval_ms}
        return LLMConfig(**options)

    def describe(self) -> dict:
        return GemmaLimits.from_config(self).describe()


class GemmaLimits(BaseModel):
    """What a request may ask of the language model: fixed by its config."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The name clients pass as `model` (config `model_id`).")
    source: str = Field(description="Folder or hub id (config `model_source`).")
    max_model_len: int = Field(description="The context length, in tokens: prompt and output together.")

    @classmethod
    def from_config(cls, config: GemmaConfig | Mapping[str, Any]) -> GemmaLimits:
        config = GemmaConfig.model_validate(config)
        return cls(model=config.model_id, source=config.model_source, max_model_len=config.max_model_len)

    def describe(self) -> dict:
        """What the ingress reads (`llm_info`) and GET /v1/models shows."""
        return self.model_dump(mode="json")


# --- checks against the model -------------------------------------------------------------------

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def check_max_tokens(max_tokens: int | None, limits: GemmaLimits) -> None:
    """An output budget the context cannot hold, whatever the prompt."""
    limit = limits.max_model_len
    if max_tokens is not None and max_tokens > limit:
        raise InvalidRequestError(f"max_tokens must be at most the context length {limit}; got {max_tokens}",
                                  "max_tokens")


def check_n(body: Any, max_n: int) -> None:
    """Choices per request (`n`, and vLLM's `best_of` where the request has it): each one is a whole
    generation, so they are capped by the config (`max_n`), not by vLLM's 16384."""
    for field in ("n", "best_of"):
        value = getattr(body, field, None)
        if value is not None and value > max_n:
            raise InvalidRequestError(f"{field} must be at most {max_n}; got {value}", field)


# vLLM request fields the public API does not take: they reach into the server (a chat template
# from the request, processor and transfer kwargs, free-form extras) or cost far more than they
# look (beam search, prompt logprobs). Anything not at its default here is a 400 naming the field.
REFUSED_EXTRAS = ("chat_template", "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "mm_payload",
                  "return_mm_kwargs", "kv_transfer_params", "vllm_xargs", "use_beam_search", "prompt_logprobs",
                  "logprob_token_ids")
MAX_LOGPROBS = 5


def check_extras(body: Any) -> None:
    """vLLM's extra request fields: the ones above are refused, `priority` must stay 0 (it would let
    a caller jump the queue), and log-probabilities are capped at MAX_LOGPROBS per token."""
    fields = getattr(body, "model_fields_set", set())
    for field in REFUSED_EXTRAS:
        if field in fields and getattr(body, field, None) not in (None, False, {}, []):
            raise InvalidRequestError(f"{field} is not accepted by this server", field)
    if getattr(body, "priority", 0):
        raise InvalidRequestError("priority must be 0 here", "priority")
    for field in ("top_logprobs", "logprobs"):
        value = getattr(body, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_LOGPROBS:
            raise InvalidRequestError(f"{field} must be at most {MAX_LOGPROBS}; got {value}", field)


def check_messages(messages: list) -> None:
    """What OpenAI refuses but vLLM's request model lets through to the chat template: no messages
    at all, an unknown role, a message without content."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", "messages")
    for index, message in enumerate(messages):
        fields = message if isinstance(message, dict) else getattr(message, "__dict__", {})
        role = fields.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{index}].role must be one of {list(CHAT_ROLES)}; got {role!r}",
                                      f"messages.{index}.role")
        # OpenAI lets only an assistant message that calls tools go without content.
        if fields.get("content") is None and not (role == "assistant" and fields.get("tool_calls")):
            raise InvalidRequestError(f"messages[{index}].content is required for a {role} message",
                                      f"messages.{index}.content")


# --- prompt refinement --------------------------------------------------------------------------


class RefineRequest(BaseModel):
    prompt: Prompt
    style: str | None = Field(None, description="A style preset to write the prompt for.")
    lora: str | None = Field(None, description="A registered LoRA whose trigger word the prompt must carry.")
    model: str | None = None
    seed: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)


class RefinedPrompt(BaseModel):
    prompt: str
    negative_prompt: str
    original_prompt: str
    refined: bool = Field(description="False when the model's output was unusable and the original was kept.")
    warning: str | None = None
    model: str | None = None


REFINE_SYSTEM = (
    "You turn short requests into detailed prompts for a text-to-image model. Describe the subject, "
    "setting, composition, lighting and style in one paragraph. Also write a negative prompt listing "
    "what to avoid. Answer only with JSON: {\"prompt\": ..., \"negative_prompt\": ...}."
)


def refine_schema(settings: RefineSettings) -> dict:
    return {
        "type": "object",
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": settings.max_prompt_chars},
            "negative_prompt": {"type": "string", "maxLength": settings.max_negative_chars},
        },
        "required": ["prompt", "negative_prompt"],
        "additionalProperties": False,
    }


def build_refine_chat(request: RefineRequest, model_id: str, settings: RefineSettings,
                      style: StylePreset | None = None, trigger_word: str | None = None,
                      instruction: str | None = None) -> dict:
    """The OpenAI chat request body (a dict, so both the ingress and jobs can send it).
    `instruction` is asked on top (a QA loop's judge feedback: vision.revision_instruction)."""
    asks = [f"Request: {request.prompt}"]
    if style is not None:
        asks.append(f"Write it for this style: {style.apply('the subject')}.")
    if trigger_word:
        asks.append(f"The prompt must contain the word {trigger_word!r}.")
    if instruction:
        asks.append(instruction)
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "system", "content": REFINE_SYSTEM}, {"role": "user", "content": "\n".join(asks)}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature if request.temperature is None else request.temperature,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "refined_prompt", "schema": refine_schema(settings), "strict": True}},
    }
    if request.seed is not None:
        body["seed"] = request.seed
    return body


_SPACES = re.compile(r"\s+")


def _clean(text: Any) -> str:
    if not isinstance(text, str):
        return ""
    return _SPACES.sub(" ", "".join(ch if ch.isprintable() else " " for ch in text)).strip()


def parse_refined(text: str | None, request: RefineRequest, model: str | None = None,
                  trigger_word: str | None = None, finish_reason: str | None = None) -> RefinedPrompt:
    """Model output -> RefinedPrompt. Never raises: unusable output keeps the original prompt."""
    original = request.prompt

    def fallback(why: str) -> RefinedPrompt:
        prompt = original if not trigger_word or trigger_word in original else f"{trigger_word}, {original}"
        return RefinedPrompt(prompt=prompt, negative_prompt="", original_prompt=original, refined=False,
                             warning=f"refinement unusable ({why}); the original prompt was kept", model=model)

    try:
        data = json.loads(text or "", strict=False)  # strict=False: raw control characters are still JSON text
    except (TypeError, ValueError):
        why = "output cut off at max_tokens" if finish_reason == "length" else "output is not valid JSON"
        return fallback(why)
    if not isinstance(data, dict):
        return fallback("output is not a JSON object")
    prompt, negative = _clean(data.get("prompt")), _clean(data.get("negative_prompt"))
    if not prompt:
        return fallback("empty prompt")
    if trigger_word and trigger_word not in prompt:
        prompt = f"{trigger_word}, {prompt}"
    return RefinedPrompt(prompt=prompt, negative_prompt=negative, original_prompt=original, refined=True,
                         model=model)


class EngineError(AtelierError):
    """An error the engine answered with; keeps its status code."""

    def __init__(self, message: str, param: str | None, status_code: int, error_type: str):
        super().__init__(message, param)
        self.status_code, self.error_type = status_code, error_type

    def __reduce__(self):
        return EngineError, (self.message, self.param, self.status_code, self.error_type)


PROMPT_LENGTH_PARAMS = frozenset({"input_tokens", "prompt_tokens", "input_text"})


def engine_error(response: Any, prompt_field: str) -> AtelierError:
    """vLLM's ErrorResponse -> an AtelierError naming the field where vLLM did not."""
    info = response.error
    code = info.code if 400 <= (info.code or 0) < 600 else 500
    # vLLM names the prompt by what it measured: its tokens, or (renderers/params.py,
    # `_text_len_check`, before tokenizing) its characters, as "input_text".
    param = prompt_field if info.param in PROMPT_LENGTH_PARAMS else info.param
    if param is None and code < 500:
        param = "max_tokens" if "max_tokens" in info.message.lower() else prompt_field
    return EngineError(info.message, param, code, "invalid_request_error" if code < 500 else "server_error")


def refined_from_response(response: Any, request: RefineRequest, trigger_word: str | None) -> RefinedPrompt:
    """The LLMServer's chat answer (or ErrorResponse) -> RefinedPrompt."""
    if hasattr(response, "error"):
        raise engine_error(response, "prompt")
    choice = response.choices[0]
    return parse_refined(choice.message.content, request, model=response.model, trigger_word=trigger_word,
                         finish_reason=choice.finish_reason)
