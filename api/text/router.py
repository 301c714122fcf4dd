"""Text: OpenAI chat and completions (SSE streaming) forwarded to the Gemma LLMServer, and
prompt refinement.

The request models are vLLM's OpenAI protocol models (through `ray.serve.llm`), so the
fields and their validation are exactly what vLLM's own server accepts. Engine errors come
back as `ErrorResponse` items and leave in Atelier's error shape, naming the field.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest as EngineChatRequest
from ray.serve.llm.openai_api_models import CompletionRequest
from vllm.exceptions import VLLMClientError, VLLMValidationError

from api import current_ingress
from deployments.errors import AtelierError, InvalidRequestError, NotFoundError, OverloadedError
from deployments.llm.contract import RefinedPrompt, RefineRequest, build_refine_chat, engine_error, refined_from_response

logger = logging.getLogger("ray.serve")

router = APIRouter(tags=["text"])


class LLMUnavailableError(AtelierError):
    status_code = 404
    error_type = "model_not_found"


def llm_handle(ingress, model: str | None):
    info = ingress.llm_info
    if info is None or "llm" not in ingress.handles:
        raise LLMUnavailableError("no language model is deployed in this application", "model")
    if model is not None and model != info["model"]:
        raise NotFoundError(f"unknown model {model!r}; available: [{info['model']!r}]", "model")
    return ingress.handles["llm"].options(stream=True)


class ChatCompletionRequest(EngineChatRequest):
    """vLLM's chat request, guarded: its validators iterate `messages` before pydantic checks the
    type, so `"messages": false` escaped as a TypeError (a 500)."""

    @model_validator(mode="wrap")
    @classmethod
    def _malformed_body_is_the_clients(cls, data: Any, handler):
        if isinstance(data, dict) and "messages" in data and not isinstance(data["messages"], list):
            raise VLLMValidationError("messages must be an array of message objects; got "
                                      f"{type(data['messages']).__name__}", parameter="messages")
        try:
            return handler(data)
        except TypeError as exc:
            raise VLLMValidationError(f"malformed request body: {exc}", parameter="body") from None

    def for_engine(self) -> EngineChatRequest:
        """The engine's own class, so the LLM replica never needs this module."""
        return EngineChatRequest.model_construct(_fields_set=self.model_fields_set, **dict(self))


def invalid_request(exc: VLLMClientError) -> InvalidRequestError:
    """vLLM's request models check some fields (prompt present, stream_options only with stream, ...)
    in validators that raise its own error, not a ValueError, so pydantic passes it through as it
    is: the client's mistake, a 400 naming the field vLLM names."""
    return InvalidRequestError(str(exc), getattr(exc, "parameter", None) or "body")


def _check_budget(ingress, max_tokens: int | None) -> None:
    limit = ingress.llm_info["max_model_len"]
    if max_tokens is not None and max_tokens > limit:
        raise InvalidRequestError(f"max_tokens must be at most the context length {limit}; got {max_tokens}",
                                  "max_tokens")


async def _first_item(stream) -> tuple[Any, Any]:
    """The first engine item (unwrapped from a streaming batch) and the raw first item."""
    try:
        raw = await stream.__anext__()
    except StopAsyncIteration:
        raise OverloadedError("the language model returned nothing; retry", retry_after=1) from None
    first = raw[0] if isinstance(raw, list) and raw else raw
    return first, raw


def _is_error(item: Any) -> bool:
    # vLLM's own ErrorResponse, not only ray's subclass of it, comes back from the engine.
    return hasattr(item, "error") and not hasattr(item, "choices")


def _sse(item: Any) -> str:
    if isinstance(item, list):
        return "".join(_sse(i) for i in item)
    if isinstance(item, str):
        return item
    if _is_error(item):
        return f"data: {item.model_dump_json()}\n\n"
    return f"data: {item.model_dump_json(exclude_unset=True)}\n\n"


async def _forward(ingress, method: str, body: EngineChatRequest | CompletionRequest,
                   prompt_field: str):
    handle = llm_handle(ingress, body.model)
    _check_budget(ingress, body.max_tokens)
    body.model = ingress.llm_info["model"]
    stream = getattr(handle, method).remote(body, None)
    try:
        first, raw = await _first_item(stream)
    except BaseException:
        stream.cancel()
        raise
    if _is_error(first):
        stream.cancel()
        raise _no_room_error(ingress, first, body, prompt_field) or engine_error(first, prompt_field)
    if not body.stream:
        stream.cancel()
        return JSONResponse(first.model_dump(mode="json", exclude_none=True))

    async def events() -> AsyncIterator[str]:
        done = False
        try:
            for item in [raw]:
                text = _sse(item)
                done = done or text.rstrip().endswith("data: [DONE]")
                yield text
            async for item in stream:
                text = _sse(item)
                done = done or text.rstrip().endswith("data: [DONE]")
                yield text
            if not done:
                yield "data: [DONE]\n\n"
        finally:
            # A client that hung up cancels the engine request, freeing its slot.
            stream.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _no_room_error(ingress, item: Any, body, prompt_field: str) -> InvalidRequestError | None:
    """vLLM shortens max_tokens to what the context has left; a prompt that fills the context leaves
    0, which vLLM reports as a bad max_tokens although the client sent none or a valid one."""
    asked = (getattr(body, "max_tokens", None), getattr(body, "max_completion_tokens", None))
    if getattr(item.error, "param", None) not in ("max_tokens", "max_completion_tokens") or 0 in asked \
            or "at least 1, got 0" not in (item.error.message or ""):
        return None
    limit = ingress.llm_info["max_model_len"]
    return InvalidRequestError(f"the {prompt_field} fills the model's context of {limit} tokens and leaves no room "
                               f"for output; it may be at most {limit - 1} tokens", prompt_field)


# The answer is JSON, or with `stream: true` server-sent events ending with `data: [DONE]`.
STREAMING_OR_JSON = {200: {"description": "The completion, or its chunks as SSE with stream: true.",
                           "content": {"application/json": {}, "text/event-stream": {}}}}

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_messages(messages: list) -> None:
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


def _materialize(messages: list) -> None:
    """Some message contents are typed Iterable[...] (OpenAI's types: e.g. a system message's parts),
    which pydantic validates lazily into an iterator that cannot be pickled to the LLM deployment:
    make them lists, validating them now."""
    for index, message in enumerate(messages):
        if isinstance(message, dict):
            for key, value in message.items():
                if hasattr(value, "__next__") and not isinstance(value, (str, bytes, list, dict)):
                    try:
                        message[key] = list(value)
                    except ValidationError as exc:
                        error = exc.errors()[0]
                        where = ".".join(str(p) for p in (index, key, *error["loc"]))
                        raise InvalidRequestError(f"messages.{where}: {error['msg']}", f"messages.{where}") from None


@router.post("/v1/chat/completions", summary="OpenAI chat completions (stream with `stream: true`)",
             responses=STREAMING_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, ingress=Depends(current_ingress)):
    _check_messages(body.messages)
    _materialize(body.messages)
    return await _forward(ingress, "chat", body.for_engine(), "messages")


@router.post("/v1/completions", summary="OpenAI completions (stream with `stream: true`)",
             responses=STREAMING_OR_JSON)
async def completions(body: CompletionRequest, ingress=Depends(current_ingress)):
    return await _forward(ingress, "completions", body, "prompt")


async def refine_prompt(ingress, request: RefineRequest) -> RefinedPrompt:
    """Refine through the LLMServer; shared by the endpoint and the ingress's graph requests."""
    handle = llm_handle(ingress, request.model)
    style = await ingress.style_preset(request.style)
    trigger_word = await ingress.lora_trigger_word(request.lora)
    body = build_refine_chat(request, ingress.llm_info["model"], ingress.llm_settings, style, trigger_word)
    stream = handle.chat.remote(EngineChatRequest.model_validate(body), None)
    try:
        first, _ = await _first_item(stream)
    finally:
        stream.cancel()
    return refined_from_response(first, request, trigger_word)


@router.post("/v1/prompts/refine", response_model=RefinedPrompt,
             summary="Turn a short request into a detailed image prompt and negative prompt")
async def refine(body: RefineRequest, ingress=Depends(current_ingress)) -> RefinedPrompt:
    return await refine_prompt(ingress, body)
