"""Text API types: vLLM's OpenAI request models (through `ray.serve.llm`), so the fields and their
validation are exactly what vLLM's own server accepts, plus the checks OpenAI makes and vLLM's
models let through."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError, model_validator
from ray.serve.llm.openai_api_models import ChatCompletionRequest as EngineChatRequest
from vllm.exceptions import VLLMValidationError

from deployments.errors import InvalidRequestError

# The answer is JSON, or with `stream: true` server-sent events ending with `data: [DONE]`.
STREAMING_OR_JSON = {200: {"description": "The completion, or its chunks as SSE with stream: true.",
                           "content": {"application/json": {}, "text/event-stream": {}}}}


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


def materialize(messages: list) -> None:
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
