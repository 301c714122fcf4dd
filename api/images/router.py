"""POST /v1/images/generations and POST /v1/images/edits (OpenAI's Images shapes).

Sync by default; `?async=true` or `Prefer: respond-async` answers 202 with a job. With
`"upscale": true` a generation is text-to-image-hd (SDXL → x4 upscaler, api/upscale/). With
`best_of: k` it is a job of k candidates judged by the LLM; the sync answer waits for that job.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from api.errors_protocol import ErrorResponse
from api.images.protocol import ImageGenerationRequest, ImagesResponse
from api.images.service import ImagesService
from api.jobs.protocol import JobView
from api.jobs.router import accepted, base_url, wants_async
from api.upscale.router import upscale_service
from api.upscale.service import UpscaleService
from api.uploads import Uploads

router = APIRouter(tags=["images"])


def images_service(request: Request) -> ImagesService:
    return request.app.state.images


def uploads(request: Request) -> Uploads:
    return request.app.state.uploads


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={202: {"model": JobView, "description": "Accepted as a job (?async=true)."}})
async def create_images(body: ImageGenerationRequest, request: Request,
                        async_: bool = Query(False, alias="async", description="Run as a job; answer 202."),
                        images: ImagesService = Depends(images_service),
                        upscale: UpscaleService = Depends(upscale_service)):
    images.check_best_of(body)  # before anything is charged
    sdxl_request = await images.sdxl_request(body, mode="text_to_image")
    best_of = images.best_of_spec(body, sdxl_request)  # None without best_of; pins the candidates' seeds
    refine = await images.text.refine_payload(body.prompt, body.style, body.lora, body.seed) if body.refine else None
    if body.upscale:  # text-to-image-hd: SDXL → x4 upscaler
        if wants_async(request, async_):
            return accepted(upscale.jobs, await upscale.submit_hd(sdxl_request, refine), request)
        return await upscale.generate_hd(body, sdxl_request, refine, base_url(request))
    if wants_async(request, async_):
        return accepted(images.jobs, await images.submit_generation(sdxl_request, refine, best_of), request)
    if best_of is not None:  # best-of-n: generate → judge, as a job, waited for
        return await images.generate_best_of(sdxl_request, refine, best_of, body.response_format, base_url(request))
    return await images.refine_then_generate(sdxl_request, refine, body.response_format, base_url(request))


@router.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             responses={202: {"model": JobView}, 413: {"model": ErrorResponse}})
async def edit_images(
    request: Request,
    image: UploadFile = File(..., description="PNG, JPEG or WebP to edit."),
    prompt: str = Form(...),
    mask: UploadFile | None = File(None, description="Inpainting mask, same size as image; white is repainted."),
    model: str | None = Form(None),
    n: int = Form(1),
    size: str | None = Form(None),
    response_format: Literal["url", "b64_json"] = Form("url"),
    negative_prompt: str | None = Form(None),
    seed: int | None = Form(None),
    steps: int | None = Form(None),
    guidance_scale: float | None = Form(None),
    strength: float = Form(0.8, gt=0, le=1),
    style: str | None = Form(None),
    lora: str | None = Form(None, description="A registered LoRA from GET /v1/models: 'name' (latest) or "
                                              "'name:version'; as on /v1/images/generations."),
    lora_scale: float = Form(1.0, description="The LoRA's weight (0 to 4)."),
    async_: bool = Query(False, alias="async"),
    images: ImagesService = Depends(images_service),
    files: Uploads = Depends(uploads),
):
    body = ImageGenerationRequest(
        prompt=prompt, model=model, n=n, size=size, response_format=response_format,
        negative_prompt=negative_prompt, seed=seed, steps=steps, guidance_scale=guidance_scale, style=style,
        lora=lora or None, lora_scale=lora_scale,
    )
    image_bytes = await files.read(image, "image")
    mask_bytes = await files.read(mask, "mask") if mask is not None else None
    width, height = images.decode_edit_inputs(image_bytes, mask_bytes)
    sdxl_request = await images.sdxl_request(
        body, mode="inpaint" if mask_bytes is not None else "image_to_image", strength=strength,
        default_size=(width // 8 * 8, height // 8 * 8),
    )
    if wants_async(request, async_):
        return accepted(images.jobs, await images.submit_edit(sdxl_request, image_bytes, mask_bytes), request)
    sdxl_request.image, sdxl_request.mask = image_bytes, mask_bytes
    return await images.generate(sdxl_request, body.response_format, base_url(request))
