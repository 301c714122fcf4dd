"""Text: POST /v1/chat/completions, POST /v1/completions (SSE with `stream: true`), typed with vLLM's
own OpenAI request models (api/text/protocol.py).

Importing these models imports vLLM, and with it torch and transformers (~10 s and a few hundred MB
per ingress replica), so api/text/router.py includes this router only in an app that deploys a
language model. Requests go to the Gemma LLMServer (api/text/service.py). Engine errors come back as
`ErrorResponse` items and leave in Atelier's error shape, naming the field. A chat's image parts are
inline images or this server's own files, sent on as data: URLs (api/text/images.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray.serve.llm.openai_api_models import CompletionRequest

from api.jobs.router import base_url
from api.text.protocol import STREAMING_OR_JSON, ChatCompletionRequest, materialize
from api.text.router import text_service
from api.text.service import TextService
from deployments.llm.contract import check_messages

router = APIRouter(tags=["text"])


async def _answer(text: TextService, method: str, body, prompt_field: str, stream: bool):
    engine_stream, first, raw = await text.open_stream(method, body, prompt_field)
    if not stream:
        engine_stream.cancel()
        return JSONResponse(first.model_dump(mode="json", exclude_none=True))
    return StreamingResponse(text.events(engine_stream, raw), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/v1/chat/completions", summary="OpenAI chat completions (stream with `stream: true`)",
             responses=STREAMING_OR_JSON)
async def chat_completions(body: ChatCompletionRequest, request: Request, text: TextService = Depends(text_service)):
    check_messages(body.messages)
    materialize(body.messages)
    text.handle(body.model)  # 404 before any image is read when no language model is deployed
    await text.images.resolve_messages(body.messages, base_url(request))  # image parts: checked data: URLs
    return await _answer(text, "chat", body.for_engine(), "messages", body.stream)


@router.post("/v1/completions", summary="OpenAI completions (stream with `stream: true`)",
             responses=STREAMING_OR_JSON)
async def completions(body: CompletionRequest, text: TextService = Depends(text_service)):
    return await _answer(text, "completions", body, "prompt", body.stream)
