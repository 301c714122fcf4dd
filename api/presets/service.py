"""Presets: the built-in styles (read-only) and each owner's own image and video presets; how a
request's `style` (images) or `preset` (videos) becomes its settings."""

from __future__ import annotations

import asyncio
import time

from api.auth import PermissionDeniedError, caller
from deployments.errors import ConflictError, InvalidRequestError, NotFoundError
from deployments.styles import StylePreset
from storage.presets import Preset, PresetExistsError, PresetNotFoundError, PresetStore


class PresetsService:
    def __init__(self, store: PresetStore, builtin: dict[str, StylePreset]):
        self.store = store
        self.builtin = {name: Preset(name=name, kind="image", category="built-in", prompt=style.prompt,
                                     negative_prompt=style.negative_prompt, steps=style.steps,
                                     guidance_scale=style.guidance_scale, builtin=True)
                        for name, style in builtin.items()}

    async def list(self, kind: str | None) -> list[Preset]:
        own = await asyncio.to_thread(self.store.list, caller().owner)
        return [p for p in [*self.builtin.values(), *own] if kind is None or p.kind == kind]

    async def get(self, name: str) -> Preset:
        if name in self.builtin:
            return self.builtin[name]
        try:
            return await asyncio.to_thread(self.store.get, caller().owner, name)
        except PresetNotFoundError:
            raise NotFoundError(f"no preset named {name!r}", "name") from None

    def _read_only(self, name: str) -> None:
        if name in self.builtin:
            raise PermissionDeniedError(f"{name!r} is a built-in preset and read-only; save a copy under another "
                                        "name", "name")

    async def create(self, preset: Preset) -> Preset:
        self._read_only(preset.name)
        preset = preset.model_copy(update={"owner": caller().owner, "builtin": False, "created_at": time.time()})
        try:
            return await asyncio.to_thread(self.store.create, preset)
        except PresetExistsError:
            raise ConflictError(f"you have a preset named {preset.name!r}; PUT /v1/presets/{preset.name} "
                                "replaces it", "name") from None

    async def replace(self, name: str, preset: Preset) -> Preset:
        self._read_only(name)
        if preset.name != name:
            raise InvalidRequestError(f"name {preset.name!r} differs from the path's {name!r}", "name")
        current = await self.get(name)
        preset = preset.model_copy(update={"owner": caller().owner, "builtin": False,
                                           "created_at": current.created_at})
        await asyncio.to_thread(self.store.replace, preset)
        return preset

    async def delete(self, name: str) -> dict:
        self._read_only(name)
        await self.get(name)
        await asyncio.to_thread(self.store.delete, caller().owner, name)
        return {"id": name, "object": "preset", "deleted": True}

    # --- use -------------------------------------------------------------------------------------

    async def user_style(self, name: str | None) -> Preset | None:
        """The caller's own image preset named by a request's `style` (None for a built-in style,
        which the model applies, or no style); 400 naming `style` if there is none of that name."""
        if name is None or name in self.builtin:
            return None
        try:
            preset = await asyncio.to_thread(self.store.get, caller().owner, name)
        except PresetNotFoundError:
            raise InvalidRequestError(f"unknown style {name!r}; known: built-in {sorted(self.builtin)} and your "
                                      "presets (GET /v1/presets)", "style") from None
        if preset.kind != "image":
            raise InvalidRequestError(f"preset {name!r} is a video preset; use it as `preset` on /v1/videos", "style")
        return preset

    async def video_preset(self, name: str | None) -> Preset | None:
        if name is None:
            return None
        try:
            preset = await asyncio.to_thread(self.store.get, caller().owner, name)
        except PresetNotFoundError:
            raise InvalidRequestError(f"unknown video preset {name!r} (GET /v1/presets?kind=video)", "preset") from None
        if preset.kind != "video":
            raise InvalidRequestError(f"preset {name!r} is an image preset; use it as `style`", "preset")
        return preset
