"""GET /v1/files/{key}: outputs and dataset images (a redirect to a presigned URL on S3)."""

from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, StreamingResponse

from api.files.service import FilesService

router = APIRouter(tags=["files"])


def files_service(request: Request) -> FilesService:
    return request.app.state.files


@router.get("/v1/files/{key:path}", responses={200: {"content": {"image/png": {}, "video/mp4": {}}}})
def get_file(key: str, files: FilesService = Depends(files_service)):
    found = files.open(key)
    if found.redirect is not None:
        return RedirectResponse(found.redirect, status_code=307)

    def chunks():
        with found.handle:
            while chunk := found.handle.read(1 << 20):
                yield chunk

    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    return StreamingResponse(chunks(), media_type=media_type, headers={"Content-Length": str(found.size)})
