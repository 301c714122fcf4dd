"""Text: POST /v1/prompts/refine here; POST /v1/chat/completions and POST /v1/completions in
api/text/chat_router.py, typed with vLLM's request models.

An app without a language model never imports vLLM (~10 s and a few hundred MB of vLLM, torch and
transformers per ingress replica, on every start and scale-out): `routers` gives it the same two
paths answering 404 `model_not_found`, as the typed routes do when no LLM is deployed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from api.text.service import TextService
from api.vision.router import vision_service
from api.vision.service import VisionService
from deployments.llm.contract import RefinedPrompt, RefineRequest

router = APIRouter(tags=["text"])
_absent = APIRouter(tags=["text"])


def text_service(request: Request) -> TextService:
    return request.app.state.text


def routers(text: TextService | None) -> list[APIRouter]:
    """The text routes for an app whose text service is `text` (None: an app built without services,
    e.g. for its OpenAPI document, gets the typed routes)."""
    if text is not None and text.llm is None:
        return [router, _absent]
    from api.text.chat_router import router as chat_router  # imports vLLM

    return [router, chat_router]


@router.post("/v1/prompts/refine", response_model=RefinedPrompt,
             summary="Turn a short request into a detailed image prompt and negative prompt")
async def refine(body: RefineRequest, text: TextService = Depends(text_service),
                 vision: VisionService = Depends(vision_service)) -> RefinedPrompt:
    text.handle(body.model)
    await vision.check_prompt(body.prompt, "prompt")  # a refused prompt is a 400 (moderation, when on)
    return await text.refine(body)


@_absent.post("/v1/chat/completions", summary="OpenAI chat completions: no language model is deployed")
@_absent.post("/v1/completions", summary="OpenAI completions: no language model is deployed")
async def no_language_model(body: dict[str, Any] = Body(...), text: TextService = Depends(text_service)):
    text.handle(body.get("model"))  # raises LLMUnavailableError: 404 model_not_found, naming `model`
