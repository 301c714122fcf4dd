"""POST /v1/images/upscale: multipart `image`, or JSON `image_key`/`image_url`: x4, sync or ?async=true.

Text-to-image-hd (POST /v1/images/generations with `"upscale": true`) is routed by api/images/
and run by this area's service (`UpscaleService.generate_hd` / `submit_hd`).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request

from api.errors_protocol import ErrorResponse
from api.images.protocol import ImagesResponse, ImageUpscaleRequest
from api.jobs.protocol import JobView
from api.jobs.router import accepted, base_url, wants_async
from api.upscale.service import UpscaleService
from api.uploads import body_schema, unexpected_files

router = APIRouter(tags=["videos"], responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def upscale_service(request: Request) -> UpscaleService:
    return request.app.state.upscale


@router.post("/v1/images/upscale", response_model=ImagesResponse, response_model_exclude_none=True,
             summary="x4 an image with the Stable Diffusion upscaler",
             responses={202: {"model": JobView, "description": "Accepted as a job (?async=true)."}},
             openapi_extra=body_schema(ImageUpscaleRequest))
async def upscale_image(request: Request, async_: bool = Query(False, alias="async"),
                        upscale: UpscaleService = Depends(upscale_service)):
    fields, files = await upscale.uploads.read_body(request)
    upload = files.pop("image", None)
    unexpected_files(files)
    body = ImageUpscaleRequest.model_validate(fields)
    if wants_async(request, async_):
        return accepted(upscale.jobs, await upscale.submit(body, upload), request)
    return await upscale.upscale(body, upload, base_url(request))
