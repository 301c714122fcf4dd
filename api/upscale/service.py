"""Upscaling: x4 an image with the Stable Diffusion upscaler (POST /v1/images/upscale), and
text-to-image-hd (POST /v1/images/generations with `"upscale": true`: SDXL → x4 upscaler).

Each request is checked by the upscaler's one `check()` against the limits fixed when the app
was built, before it runs now or is enqueued as a job.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from api.files.service import FilesService
from api.images.protocol import ImageData, ImageGenerationRequest, ImagesResponse, ImageUpscaleRequest
from api.jobs.service import JobsService
from api.models.service import ModelsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter
from api.text.service import TextService
from api.uploads import Uploads
from api.vision.service import VisionService
from deployments.diffusion import random_seed
from deployments.errors import InvalidRequestError
from deployments.llm.contract import RefineRequest
from deployments.sdxl.contract import SDXLRequest, SDXLResponse, routed
from deployments.upscaler import contract as upscaler_contract
from deployments.upscaler.contract import UpscaleMedia, UpscalerLimits, UpscaleRequest, UpscaleResponse
from graphs.payloads import ImageUpscalePayload, TextToImageHDPayload
from graphs.pipelines import apply_refined
from storage.jobs import JobRecord


class UpscaleService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)
    vision: "VisionService | None" = None  # output moderation of the HD stills (build_services sets it)

    def __init__(self, models: ModelsService, text: TextService, jobs: JobsService, files: FilesService,
                 uploads: Uploads):
        self.models = models  # the upscaler's (and SDXL's) handle and limits; not deployed is a 404
        self.text = text  # text-to-image-hd's refine, when asked
        self.jobs = jobs
        self.files = files
        self.uploads = uploads

    # --- POST /v1/images/upscale --------------------------------------------------------------------

    async def checked(self, body: ImageUpscaleRequest, upload: bytes | None) -> tuple[UpscaleRequest, bytes | None]:
        """The upscale request for a body (its input named by `image_key` when it is stored, else
        carried as `image`), checked against the upscaler's contract. `upload`: the file `image`."""
        limits: UpscalerLimits = self.models.limits_of("upscaler")
        seed = body.seed if body.seed is not None else random_seed()
        request = UpscaleRequest(prompt=body.prompt, steps=body.steps, noise_level=body.noise_level, seed=seed,
                                 model=body.model)
        upscaler_contract.check(request, limits)
        key, data, image = await self.uploads.load_image({"image": upload, "image_key": body.image_key,
                                                          "image_url": body.image_url})
        if image is None:
            raise InvalidRequestError("give an image: a file `image`, or `image_key` or `image_url`", "image")
        param = "image" if upload is not None else "image_key" if body.image_key else "image_url"
        upscaler_contract.check(request, limits, UpscaleMedia(width=image.width, height=image.height, param=param))
        self.rate.charge(max(1, request.steps or limits.default_steps), "steps")
        request.image_key = key
        return request, data

    async def submit(self, body: ImageUpscaleRequest, upload: bytes | None) -> JobRecord:
        """Enqueue an images.upscale job; an upload is stored first, so the job reads it by key."""
        request, data = await self.checked(body, upload)
        key = request.image_key or await self.uploads.store(data)
        payload = upscale_payload(request, key)
        return await self.jobs.submit_async(payload, ["upscale"])

    async def upscale(self, body: ImageUpscaleRequest, upload: bytes | None, base_url: str) -> ImagesResponse:
        request, data = await self.checked(body, upload)
        store = body.response_format == "url"
        request.image, request.store, request.output_id = data, store, self.files.output_id() if store else None
        result: UpscaleResponse = await self.models.handle("upscaler").upscale.remote(request)
        item = (ImageData(url=self.files.url_for(result.key, base_url), seed=result.seed) if store
                else ImageData(b64_json=base64.b64encode(result.png).decode(), seed=result.seed))
        return ImagesResponse(created=int(time.time()), data=[item], model=result.model,
                              size=f"{result.width}x{result.height}", steps=result.steps,
                              elapsed_s=round(result.elapsed_s, 4))

    # --- text-to-image-hd: POST /v1/images/generations with "upscale": true --------------------------

    def moderation_spec(self) -> dict | None:
        """The job's `moderation` section when outputs are checked (api/vision)."""
        return self.vision.moderation_spec() if self.vision is not None else None

    def check_hd(self, sdxl_request: SDXLRequest) -> None:
        """SDXL's images must be upscalable: their size is the request's `size`."""
        upscaler_contract.check(UpscaleRequest(), self.models.limits_of("upscaler"),
                                UpscaleMedia(width=sdxl_request.width, height=sdxl_request.height, param="size"))

    async def submit_hd(self, sdxl_request: SDXLRequest, refine: dict | None) -> JobRecord:
        """Enqueue an images.text_to_image_hd job: [refine] → generate → upscale."""
        self.check_hd(sdxl_request)
        payload = text_to_image_hd_payload(sdxl_request, refine, self.moderation_spec())
        stages = (["refine"] if refine else []) + ["generate", "upscale"]
        return await self.jobs.submit_async(payload, stages)

    async def generate_hd(self, body: ImageGenerationRequest, sdxl_request: SDXLRequest, refine: dict | None,
                          base_url: str) -> ImagesResponse:
        """SDXL → x4 upscaler, now. SDXL stores its images and the upscaler reads them by key, so
        the stills never pass through the ingress; each image is upscaled with its own seed."""
        self.check_hd(sdxl_request)
        refined = None
        if refine is not None:
            refined = await self.text.refine(RefineRequest.model_validate(refine["request"]))
            sdxl_request = SDXLRequest.model_validate(apply_refined(sdxl_request.model_dump(), refined))
        moderated = self.vision is not None and self.vision.checks_outputs
        output_id = self.files.output_id()
        # The upscaler reads each still by key; with output checks on the stills come back as PNGs,
        # are looked at, and are stored only once every one passed.
        sdxl_request.store, sdxl_request.output_id = not moderated, output_id
        generated: SDXLResponse = await routed(self.models.handle("sdxl"), sdxl_request).generate.remote(sdxl_request)
        if moderated:
            await self.vision.store_checked(generated, output_id)
        store = body.response_format == "url"
        upscaler = self.models.handle("upscaler")
        results: list[UpscaleResponse] = await asyncio.gather(*(
            upscaler.upscale.remote(UpscaleRequest(
                image_key=image.key, prompt=generated.prompt, seed=image.seed, store=store,
                output_id=f"{output_id}.hd-{i}" if store else None))
            for i, image in enumerate(generated.images)))
        data = [
            ImageData(url=self.files.url_for(r.key, base_url), seed=r.seed, revised_prompt=generated.prompt)
            if store else
            ImageData(b64_json=base64.b64encode(r.png).decode(), seed=r.seed, revised_prompt=generated.prompt)
            for r in results
        ]
        return ImagesResponse(created=int(time.time()), data=data, model=f"{generated.model}+{results[0].model}",
                              size=f"{results[0].width}x{results[0].height}", steps=generated.steps,
                              elapsed_s=round(generated.elapsed_s + sum(r.elapsed_s for r in results), 4),
                              refine=refined.model_dump() if refined else None)


# --- the job payloads (stored as the ingress has always stored them) ------------------------------


def upscale_payload(request: UpscaleRequest, image_key: str) -> ImageUpscalePayload:
    """images.upscale: the settings, the prompt and the input's key."""
    section: dict[str, Any] = {"steps": request.steps, "noise_level": request.noise_level, "seed": request.seed,
                               "prompt": request.prompt, "image_key": image_key}
    return ImageUpscalePayload.create(upscale=section)


def text_to_image_hd_payload(sdxl_request: SDXLRequest, refine: dict | None,
                             moderation: dict | None = None) -> TextToImageHDPayload:
    """images.text_to_image_hd: SDXL's request (whole), its refine stage, and the upscaler's defaults
    (each image is upscaled with its own seed and SDXL's prompt)."""
    return TextToImageHDPayload.create(sdxl=sdxl_request, refine=refine,
                                       upscale={"steps": None, "noise_level": None, "seed": None},
                                       **({"moderation": moderation} if moderation else {}))
