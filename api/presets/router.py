"""Presets: GET /v1/presets (`?kind=image|video`), GET/PUT/DELETE /v1/presets/{name}, POST /v1/presets.

Built-in styles are listed and read-only (403 to change them); the rest are the caller's own.
An image preset is used as `style` on /v1/images/generations and /edits (and a text-to-video's
still); a video preset as `preset` on /v1/videos."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, Query, Request

from api.presets.service import PresetsService
from storage.presets import Preset

router = APIRouter(tags=["presets"])


def presets_service(request: Request) -> PresetsService:
    return request.app.state.presets


@router.get("/v1/presets")
async def list_presets(kind: Literal["image", "video"] | None = Query(None),
                       presets: PresetsService = Depends(presets_service)) -> dict:
    return {"object": "list", "data": [p.model_dump(mode="json", exclude={"owner"})
                                       for p in await presets.list(kind)]}


@router.get("/v1/presets/{name}", response_model=Preset)
async def get_preset(name: str, presets: PresetsService = Depends(presets_service)) -> Preset:
    return await presets.get(name)


@router.post("/v1/presets", status_code=201, response_model=Preset)
async def create_preset(body: Preset, presets: PresetsService = Depends(presets_service)) -> Preset:
    return await presets.create(body)


@router.put("/v1/presets/{name}", response_model=Preset)
async def replace_preset(name: str, body: Preset, presets: PresetsService = Depends(presets_service)) -> Preset:
    return await presets.replace(name, body)


@router.delete("/v1/presets/{name}")
async def delete_preset(name: str, presets: PresetsService = Depends(presets_service)) -> dict:
    return await presets.delete(name)
