"""POST /v1/images/judge: the language model scores images against the prompt they were made for.

Moderation has no route of its own: the areas that generate call VisionService before they do
(the prompt) and before they store (each image).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from api.jobs.router import base_url
from api.vision.protocol import JudgeRequest, JudgeResponse
from api.vision.service import VisionService

router = APIRouter(tags=["vision"])


def vision_service(request: Request) -> VisionService:
    return request.app.state.vision


@router.post("/v1/images/judge", response_model=JudgeResponse, response_model_exclude_none=True,
             summary="Score images 1-10 against their prompt, with reasons and defects (JSON schema answers)")
async def judge_images(body: JudgeRequest, request: Request,
                       vision: VisionService = Depends(vision_service)) -> JudgeResponse:
    return await vision.judge_request(body, base_url(request))
