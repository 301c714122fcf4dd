"""GET /v1/prompts/suggestions: autocomplete (`q`) from the curated list, or random prompts for
inspiration (no `q`, or `random=true`)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from api.prompts.service import PromptsService, SuggestionList

router = APIRouter(tags=["text"])


def prompts_service(request: Request) -> PromptsService:
    return request.app.state.prompts


@router.get("/v1/prompts/suggestions", response_model=SuggestionList)
def suggestions(q: str = Query("", max_length=200, description="What was typed so far; empty: random prompts."),
                n: int = Query(8, ge=1, le=50), random: bool = Query(False, description="Random prompts, whatever q is."),
                seed: int | None = Query(None, ge=0, le=2**32 - 1, description="Repeatable random picks."),
                prompts: PromptsService = Depends(prompts_service)) -> SuggestionList:
    if random or not q.strip():
        return prompts.inspire(n, seed)
    return prompts.complete(q, n)
