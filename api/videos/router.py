"""Videos (OpenAI's Videos API shapes).

    POST   /v1/videos                  JSON or multipart → 202 video object; one job runs every stage
    GET    /v1/videos                  list, newest first (`after`, `limit`, `order`)
    GET    /v1/videos/{id}             video object: status, progress 0-100, current stage
    GET    /v1/videos/{id}/content     the MP4 (`?variant=thumbnail`: the poster PNG); 409 until completed
    POST   /v1/videos/{id}/cancel      stops the remaining stages
    DELETE /v1/videos/{id}             cancels if running, then deletes the video's files and record

With an input image, POST /v1/videos is image-to-video; with only a prompt it is text-to-video
(api/videos/service.py). Image upscaling is api/upscale/.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from api.errors_protocol import ErrorResponse
from api.files.router import get_file
from api.jobs.router import base_url
from api.uploads import body_schema, unexpected_files
from api.videos.protocol import VideoCreateRequest, VideoDeleted, VideoList, VideoObject
from api.videos.service import VideosService

router = APIRouter(tags=["videos"], responses={400: {"model": ErrorResponse}, 404: {"model": ErrorResponse}})


def videos_service(request: Request) -> VideosService:
    return request.app.state.videos


@router.post("/v1/videos", status_code=202, response_model=VideoObject,
             summary="Create a video: image-to-video with input_reference, or text-to-video from a prompt",
             openapi_extra=body_schema(VideoCreateRequest))
async def create_video(request: Request, videos: VideosService = Depends(videos_service)) -> JSONResponse:
    fields, files = await videos.uploads.read_body(request)
    upload = files.pop("input_reference", None)
    unexpected_files(files)
    body = VideoCreateRequest.model_validate(fields)
    view = await videos.create(body, upload, base_url(request))
    return JSONResponse(view.model_dump(mode="json"), status_code=202, headers={"Location": f"/v1/videos/{view.id}"})


@router.get("/v1/videos", response_model=VideoList)
async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                      order: Literal["asc", "desc"] = "desc",
                      videos: VideosService = Depends(videos_service)) -> VideoList:
    return await videos.list(after, limit, order, base_url(request))


@router.get("/v1/videos/{video_id}", response_model=VideoObject)
async def get_video(video_id: str, request: Request, videos: VideosService = Depends(videos_service)) -> VideoObject:
    return await videos.get(video_id, base_url(request))


@router.get("/v1/videos/{video_id}/content",
            responses={200: {"content": {"video/mp4": {}, "image/png": {}}}, 409: {"model": ErrorResponse}})
async def get_video_content(video_id: str, variant: Literal["video", "thumbnail", "spritesheet"] = "video",
                            videos: VideosService = Depends(videos_service)):
    key = await videos.content_key(video_id, variant)
    # Streams from storage, or redirects (307) to a presigned URL when storage is S3.
    response = await asyncio.to_thread(get_file, key, videos.files)
    extension = "mp4" if variant == "video" else "png"
    response.headers["Content-Disposition"] = f'inline; filename="{video_id}.{extension}"'
    return response


@router.post("/v1/videos/{video_id}/cancel", response_model=VideoObject)
async def cancel_video(video_id: str, request: Request,
                       videos: VideosService = Depends(videos_service)) -> VideoObject:
    return await videos.cancel(video_id, base_url(request))


@router.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses={409: {"model": ErrorResponse}})
async def delete_video(video_id: str, videos: VideosService = Depends(videos_service)) -> VideoDeleted:
    return await videos.delete(video_id)
