"""Vision: the language model looks at images. The judge (POST /v1/images/judge, and best-of-n),
and moderation: a prompt checked before any generation, each generated image before it is stored.

Every question is one of deployments/llm/vision.py's chat bodies, sent to the LLM deployment
through TextService (its handle, its first-item read), asked under a JSON schema so the answer
parses. Images are judged and moderated one request each, all at once: the engine batches them.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Any

from api.ratelimit import NO_RATE_LIMITS, RateLimiter, token_cost
from api.text.images import ImageInputs
from api.text.service import TextService, is_error
from api.vision.protocol import JudgedImage, JudgeImage, JudgeRequest, JudgeResponse
from deployments.errors import InvalidRequestError
from deployments.llm import vision
from deployments.llm.contract import engine_error
from deployments.llm.vision import JudgeSettings, Judgement, ModerationSettings, ModerationVerdict
from deployments.sdxl.contract import SDXLResponse
from storage.fs import Storage
from storage.keys import output_key

PROMPT_VERDICTS_CACHED = 1024  # a prompt checked once is not asked again (text-to-video checks it twice)


class VisionService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)

    def __init__(self, text: TextService, images: ImageInputs, storage: Storage, judge: JudgeSettings,
                 moderation: ModerationSettings):
        self.text = text  # the LLM handle and how to read its answer
        self.images = images  # images by key or inline, checked and owner-checked
        self.storage = storage  # outputs that passed moderation are stored here
        self.judge_settings = judge
        self.moderation = moderation
        self._verdicts: OrderedDict[str, ModerationVerdict] = OrderedDict()

    @property
    def model(self) -> str:
        self.text.handle(None)  # 404 when no language model is deployed
        return self.text.limits.model

    async def ask(self, body: dict, param: str) -> Any:
        """One chat body's answer; an engine error is the request's (naming `param`)."""
        answer = await self.text.answer(body)
        if is_error(answer):
            raise engine_error(answer, param)
        return answer

    # --- the judge ---------------------------------------------------------------------------------

    async def judge(self, images: list[bytes], prompt: str, criteria: str | None = None,
                    seed: int | None = None) -> list[Judgement]:
        """Each image judged against `prompt` (one request per image, all at once), in order."""
        model = self.model
        bodies = [vision.build_judge_chat(image, prompt, model, self.judge_settings, criteria, seed)
                  for image in images]
        answers = await asyncio.gather(*(self.ask(body, "images") for body in bodies))
        return [vision.parse_judgement(answer) for answer in answers]

    async def judge_request(self, body: JudgeRequest, base_url: str) -> JudgeResponse:
        """POST /v1/images/judge: every image read and checked (a 4xx naming it), then judged."""
        self.text.handle(body.model)  # 404 when no language model is deployed, or another is named
        settings = self.judge_settings
        if len(body.images) > settings.max_images:
            raise InvalidRequestError(f"images holds {len(body.images)} images; at most {settings.max_images} "
                                      "per request here", "images")
        vision.check_criteria(body.criteria, settings)
        for index, item in enumerate(body.images):
            if (item.key is None) == (item.b64_json is None):
                raise InvalidRequestError(f"images.{index} needs exactly one of key and b64_json", f"images.{index}")
        self.rate.charge(token_cost(len(body.images), settings.max_tokens, self.text.limits.max_model_len), "images")
        loaded = await asyncio.gather(*(self._image(item, f"images.{index}", base_url)
                                        for index, item in enumerate(body.images)))
        judgements = await self.judge([data for _, data in loaded], body.prompt, body.criteria, body.seed)
        return JudgeResponse(model=self.text.limits.model, data=[
            JudgedImage(index=index, key=key, **judgement.model_dump())
            for index, ((key, _), judgement) in enumerate(zip(loaded, judgements))])

    async def _image(self, item: JudgeImage, param: str, base_url: str) -> tuple[str | None, bytes]:
        """(its key, if it came by one; the image), checked."""
        key = None
        if item.key is not None:
            param += ".key"
            key = self.images.key_of(item.key, param, base_url)
            data = await self.images.from_key(key, param)
        else:
            param += ".b64_json"
            data = self.images.from_base64(item.b64_json, param)
        await asyncio.to_thread(self.images.check, data, param)
        return key, data

    # --- moderation --------------------------------------------------------------------------------

    def moderation_spec(self) -> dict | None:
        """What a job needs to look at its outputs (graphs/payloads.ModerationSpec); None when off."""
        if not self.moderation.active_outputs:
            return None
        return {"model": self.model, "settings": self.moderation.model_dump(mode="json")}

    async def check_prompt(self, prompt: str | None, param: str = "prompt") -> None:
        """ContentPolicyError (a 400 naming `param` and the category) when the prompt is refused."""
        if not self.moderation.active_prompts or not prompt:
            return
        verdict = self._verdicts.get(prompt)
        if verdict is None:
            body = vision.build_prompt_moderation_chat(prompt, self.model, self.moderation)
            verdict = vision.parse_moderation(await self.ask(body, param), self.moderation)
            self._verdicts[prompt] = verdict
            while len(self._verdicts) > PROMPT_VERDICTS_CACHED:
                self._verdicts.popitem(last=False)
        else:
            self._verdicts.move_to_end(prompt)
        if verdict.flagged:
            raise vision.refusal(verdict, "prompt", param)

    async def check_images(self, pngs: list[bytes], param: str = "prompt") -> None:
        """ContentPolicyError for the first image refused (each looked at in its own request, all at once)."""
        if not self.moderation.active_outputs or not pngs:
            return
        model = self.model
        answers = await asyncio.gather(*(self.ask(vision.build_image_moderation_chat(png, model, self.moderation),
                                                  param) for png in pngs))
        for answer in answers:
            verdict = vision.parse_moderation(answer, self.moderation)
            if verdict.flagged:
                raise vision.refusal(verdict, "image", param)

    @property
    def checks_outputs(self) -> bool:
        return self.moderation.active_outputs

    async def store_checked(self, result: SDXLResponse, output_id: str | None) -> None:
        """Generated images (their PNGs, not stored yet) looked at; only when every one passes are
        they stored (under `output_id`, when given), so a refused image never is."""
        await self.check_images([image.png for image in result.images])
        if output_id is None:
            return
        for index, image in enumerate(result.images):
            image.key = await asyncio.to_thread(self.storage.put_bytes, output_key(output_id, index), image.png,
                                                "image/png")
            image.png = None
