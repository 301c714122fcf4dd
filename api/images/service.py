"""Images: OpenAI's Images requests mapped onto SDXL's contract, run now or as a job."""

from __future__ import annotations

import asyncio
import base64
import time

from ray.serve.handle import DeploymentHandle

from api.files.service import FilesService
from api.images.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from api.jobs.service import JobsService
from api.models.service import ModelsService
from api.presets.service import PresetsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter, image_cost
from api.text.service import TextService
from deployments.errors import InvalidRequestError
from deployments.llm.contract import RefinedPrompt, RefineRequest
from deployments.media import decode_image, parse_size
from deployments.sdxl import contract as sdxl_contract
from deployments.sdxl.contract import SDXLRequest, SDXLResponse, routed
from graphs.payloads import ImageEditPayload, ImageGenerationPayload, TextToImageHDPayload
from graphs.pipelines import apply_refined
from storage.fs import Storage
from storage.jobs import JobRecord
from storage.keys import new_id

SDXLJobPayload = ImageGenerationPayload | ImageEditPayload | TextToImageHDPayload
# The job kinds whose SDXL section a replay checks again (ImagesService.recheck_replay).
SDXL_JOB_KINDS = tuple(cls.model_fields["kind"].default for cls in (ImageGenerationPayload, ImageEditPayload,
                                                                    TextToImageHDPayload))


class ImagesService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)
    presets: "PresetsService | None" = None  # the caller's own style presets (build_services sets them)

    def __init__(self, sdxl: DeploymentHandle, models: ModelsService, text: TextService, jobs: JobsService,
                 files: FilesService, storage: Storage, max_upload_pixels: int):
        self.sdxl = sdxl
        self.models = models
        self.text = text
        self.jobs = jobs
        self.files = files
        self.storage = storage
        self.max_upload_pixels = max_upload_pixels

    @property
    def limits(self) -> sdxl_contract.SDXLLimits:
        return self.models.sdxl

    async def sdxl_request(self, body: ImageGenerationRequest, mode: str, strength: float = 0.8,
                           default_size: tuple[int, int] | None = None) -> SDXLRequest:
        """The SDXL request for an Images body, checked against SDXL's contract, so jobs never fail
        on bad input; a named LoRA must be registered."""
        preset = await self.presets.user_style(body.style) if self.presets else None
        if preset is not None:  # the caller's own preset, applied here (the model knows only the built-ins)
            body = body.model_copy(update={
                "prompt": preset.apply(body.prompt), "style": None,
                "negative_prompt": ", ".join(p for p in (preset.negative_prompt, body.negative_prompt) if p) or None,
                "steps": body.steps or preset.steps, "size": body.size or (preset.size if not default_size else None),
                "guidance_scale": body.guidance_scale if body.guidance_scale is not None else preset.guidance_scale})
        if body.size is not None:
            width, height = parse_size(body.size)
        else:
            width, height = default_size or (self.limits.default_size, self.limits.default_size)
        request = SDXLRequest(
            mode=mode, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=width,
            height=height, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
            strength=strength, style=body.style, lora=body.lora, lora_scale=body.lora_scale, model=body.model,
        )
        sdxl_contract.check(request, self.limits)
        self.charge(request)
        lora = await self.models.lora_record(body.lora)
        request.lora = lora.id if lora else None
        return request

    def charge(self, request: SDXLRequest) -> None:
        width, height = sdxl_contract.size_of(request, self.limits) or (self.limits.default_size,) * 2
        self.rate.charge(image_cost(request.n, request.steps, width, height, self.limits.default_steps), "n")

    def recheck_replay(self, payload: SDXLJobPayload) -> SDXLJobPayload:
        """A replayed SDXL job, checked against SDXL's limits of today and charged, as a new submit is."""
        sdxl_contract.check(payload.sdxl, self.limits)
        self.charge(payload.sdxl)
        return payload

    def decode_edit_inputs(self, image_bytes: bytes, mask_bytes: bytes | None) -> tuple[int, int]:
        """Decode the edit's image (and mask) now, so a bad upload is a 400, not a failed job; SDXL
        takes inputs of at most its largest size in pixels. Returns the image's size."""
        max_pixels = min(self.max_upload_pixels, self.limits.max_input_pixels)
        decoded = decode_image(image_bytes, "image", max_pixels=max_pixels)
        if mask_bytes is not None:
            decoded_mask = decode_image(mask_bytes, "mask", max_pixels=max_pixels, mode="L")
            if decoded_mask.size != decoded.size:
                raise InvalidRequestError(
                    f"mask is {decoded_mask.width}x{decoded_mask.height} but image is "
                    f"{decoded.width}x{decoded.height}; they must match", "mask")
        return decoded.width, decoded.height

    async def submit_generation(self, sdxl_request: SDXLRequest, refine: dict | None) -> JobRecord:
        stages = ["refine", "generate"] if refine else ["generate"]
        return await self.jobs.submit_async(ImageGenerationPayload.create(sdxl=sdxl_request, refine=refine), stages)

    async def submit_edit(self, sdxl_request: SDXLRequest, image_bytes: bytes, mask_bytes: bytes | None) -> JobRecord:
        """Jobs read their inputs from storage: the uploads are stored once, then passed by key."""
        upload_id = new_id("upload")
        sdxl_request.image_key = await asyncio.to_thread(self.storage.put_bytes, f"uploads/{upload_id}/image",
                                                         image_bytes)
        if mask_bytes is not None:
            sdxl_request.mask_key = await asyncio.to_thread(self.storage.put_bytes, f"uploads/{upload_id}/mask",
                                                            mask_bytes)
        return await self.jobs.submit_async(ImageEditPayload.create(sdxl=sdxl_request), ["generate"])

    async def refine_then_generate(self, sdxl_request: SDXLRequest, refine: dict | None, response_format: str,
                                   base_url: str) -> ImagesResponse:
        refined = None
        if refine is not None:
            refined = await self.text.refine(RefineRequest.model_validate(refine["request"]))
            sdxl_request = SDXLRequest.model_validate(apply_refined(sdxl_request.model_dump(), refined))
        return await self.generate(sdxl_request, response_format, base_url, refined)

    async def generate(self, sdxl_request: SDXLRequest, response_format: str, base_url: str,
                       refined: RefinedPrompt | None = None) -> ImagesResponse:
        store = response_format == "url"
        if store:
            sdxl_request.store, sdxl_request.output_id = True, self.files.output_id()
        result: SDXLResponse = await routed(self.sdxl, sdxl_request).generate.remote(sdxl_request)
        data = []
        for image in result.images:
            if store:
                data.append(ImageData(url=self.files.url_for(image.key, base_url), seed=image.seed,
                                      revised_prompt=result.prompt))
            else:
                data.append(ImageData(b64_json=base64.b64encode(image.png).decode(), seed=image.seed,
                                      revised_prompt=result.prompt))
        first = result.images[0]
        return ImagesResponse(created=int(time.time()), data=data, model=result.model,
                              size=f"{first.width}x{first.height}", steps=result.steps,
                              elapsed_s=round(result.elapsed_s, 4), batch_images=result.batch_images,
                              refine=refined.model_dump() if refined else None)
