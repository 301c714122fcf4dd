"""Text: OpenAI chat and completions forwarded to the Gemma LLMServer, and prompt refinement.

Refinement has one path: `refine_chat` builds the chat body (used as is by a job's refine stage)
and `refine` sends it and parses the answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, AsyncIterator

from ray.serve.handle import DeploymentHandle

from api.models.service import ModelsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter, token_cost
from api.text.images import ImageInputs
from deployments.errors import AtelierError, InvalidRequestError, NotFoundError, OverloadedError
from deployments.llm import contract as llm_contract
from deployments.llm.contract import (GemmaConfig, GemmaLimits, RefinedPrompt, RefineRequest, RefineSettings,
                                      build_refine_chat, engine_error, refined_from_response)

if TYPE_CHECKING:  # vLLM's request models: imported only where a language model is deployed
    from ray.serve.llm.openai_api_models import ChatCompletionRequest as EngineChatRequest
    from ray.serve.llm.openai_api_models import CompletionRequest


class LLMUnavailableError(AtelierError):
    status_code = 404
    error_type = "model_not_found"


async def first_item(stream) -> tuple[Any, Any]:
    """The first engine item (unwrapped from a streaming batch) and the raw first item."""
    try:
        raw = await stream.__anext__()
    except StopAsyncIteration:
        raise OverloadedError("the language model returned nothing; retry", retry_after=1) from None
    first = raw[0] if isinstance(raw, list) and raw else raw
    return first, raw


def is_error(item: Any) -> bool:
    # vLLM's own ErrorResponse, not only ray's subclass of it, comes back from the engine.
    return hasattr(item, "error") and not hasattr(item, "choices")


def sse(item: Any) -> str:
    if isinstance(item, list):
        return "".join(sse(i) for i in item)
    if isinstance(item, str):
        return item
    if is_error(item):
        return f"data: {item.model_dump_json()}\n\n"
    return f"data: {item.model_dump_json(exclude_unset=True)}\n\n"


class TextService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)

    def __init__(self, llm: DeploymentHandle | None, limits: GemmaLimits | None, settings: RefineSettings,
                 models: ModelsService, max_n: int = GemmaConfig.model_fields["max_n"].default,
                 images: ImageInputs | None = None):
        self.llm = llm
        self.limits = limits
        self.max_n = max_n  # choices per request (config llm.max_n)
        self.settings = settings
        self.models = models  # style presets and LoRA trigger words for refinement
        # Image content parts: read, checked, sent as data: URLs (api/text/images.py); none without.
        self.images = images or ImageInputs(None, lambda key: False, 0, 0, max_images=0)

    def handle(self, model: str | None) -> DeploymentHandle:
        if self.limits is None or self.llm is None:
            raise LLMUnavailableError("no language model is deployed in this application", "model")
        if model is not None and model != self.limits.model:
            raise NotFoundError(f"unknown model {model!r}; available: [{self.limits.model!r}]", "model")
        return self.llm.options(stream=True)

    async def open_stream(self, method: str, body: EngineChatRequest | CompletionRequest, prompt_field: str):
        """Start a chat or completion on the engine: (stream, first item, raw first item). An engine
        error before the first token is the request's error (a 400 naming the field)."""
        handle = self.handle(body.model)
        llm_contract.check_max_tokens(body.max_tokens, self.limits)
        llm_contract.check_n(body, self.max_n)
        llm_contract.check_extras(body)
        asked = getattr(body, "max_tokens", None) or getattr(body, "max_completion_tokens", None)
        self.rate.charge(token_cost(getattr(body, "n", 1), asked, self.limits.max_model_len), "max_tokens")
        body.model = self.limits.model
        stream = getattr(handle, method).remote(body, None)
        try:
            first, raw = await first_item(stream)
        except BaseException:
            stream.cancel()
            raise
        if is_error(first):
            stream.cancel()
            raise self._no_room_error(first, body, prompt_field) or engine_error(first, prompt_field)
        return stream, first, raw

    @staticmethod
    async def events(stream, raw) -> AsyncIterator[str]:
        """The stream as server-sent events, ending with `data: [DONE]`."""
        done = False
        try:
            for item in [raw]:
                text = sse(item)
                done = done or text.rstrip().endswith("data: [DONE]")
                yield text
            async for item in stream:
                text = sse(item)
                done = done or text.rstrip().endswith("data: [DONE]")
                yield text
            if not done:
                yield "data: [DONE]\n\n"
        finally:
            # A client that hung up cancels the engine request, freeing its slot.
            stream.cancel()

    def _no_room_error(self, item: Any, body, prompt_field: str) -> InvalidRequestError | None:
        """vLLM shortens max_tokens to what the context has left; a prompt that fills the context leaves
        0, which vLLM reports as a bad max_tokens although the client sent none or a valid one."""
        asked = (getattr(body, "max_tokens", None), getattr(body, "max_completion_tokens", None))
        if getattr(item.error, "param", None) not in ("max_tokens", "max_completion_tokens") or 0 in asked \
                or "at least 1, got 0" not in (item.error.message or ""):
            return None
        limit = self.limits.max_model_len
        return InvalidRequestError(f"the {prompt_field} fills the model's context of {limit} tokens and leaves no "
                                   f"room for output; it may be at most {limit - 1} tokens", prompt_field)

    async def refine_chat(self, request: RefineRequest) -> tuple[dict, str | None]:
        """The chat body that refines `request` (with its style and LoRA trigger word), and the trigger word."""
        self.handle(request.model)
        style = self.models.style_preset(request.style)
        trigger_word = await self.models.lora_trigger_word(request.lora)
        return build_refine_chat(request, self.limits.model, self.settings, style, trigger_word), trigger_word

    async def answer(self, body: dict) -> Any:
        """Send one chat body (built by the server: refinement, the judge, moderation) and return the
        engine's first item: the whole answer, as the body does not stream."""
        handle = self.handle(body.get("model"))
        from ray.serve.llm.openai_api_models import ChatCompletionRequest as EngineChatRequest

        stream = handle.chat.remote(EngineChatRequest.model_validate(body), None)
        try:
            first, _ = await first_item(stream)
        finally:
            stream.cancel()
        return first

    async def refine(self, request: RefineRequest) -> RefinedPrompt:
        self.handle(request.model)
        body, trigger_word = await self.refine_chat(request)
        return refined_from_response(await self.answer(body), request, trigger_word)

    async def refine_payload(self, prompt: str, style: str | None, lora: str | None, seed: int | None) -> dict:
        """What a job needs to run the refine stage: the request and the chat body to send (404 now,
        not a failed job, when no LLM is deployed)."""
        request = RefineRequest(prompt=prompt, style=style, lora=lora, seed=seed)
        chat, trigger_word = await self.refine_chat(request)
        return {"request": request.model_dump(mode="json"), "chat": chat, "trigger_word": trigger_word}
