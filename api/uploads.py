"""Uploaded and referenced input images: read within the size limit, decoded so a bad image is a
400 naming its field, and stored once so a job can read it by key.

A route that takes JSON or a multipart form (POST /v1/videos, POST /v1/images/upscale) reads its
body with `Uploads.read_body`, and its one image, whichever way it came, with `Uploads.load_image`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from fastapi import Request
from PIL import Image
from starlette.datastructures import UploadFile  # what a form holds; FastAPI's UploadFile subclasses it

from api.images.protocol import ImageReference
from api.security import FORMS, JSON, media_type, require_media_type
from deployments.errors import AtelierError, InvalidRequestError, PayloadTooLargeError, parse_json
from deployments.media import decode_image
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage, validate_key
from storage.keys import OUTPUTS_PREFIX, new_id

_NESTED_FIELD = re.compile(r"(\w+)\[(\w+)\]")


class Uploads:
    def __init__(self, storage: Storage, max_upload_bytes: int, max_upload_pixels: int,
                 readable: Callable[[str], bool] = lambda key: True):
        self.storage = storage
        self.max_upload_bytes = max_upload_bytes
        self.max_upload_pixels = max_upload_pixels
        self.readable = readable  # whether the caller may read a stored output (FilesService.readable)

    async def read(self, upload: UploadFile, param: str, limit: int | None = None) -> bytes:
        """The file's bytes; 413 naming `param` past `limit` (default: max_upload_bytes)."""
        limit = limit or self.max_upload_bytes
        if upload.size is not None and upload.size > limit:
            raise PayloadTooLargeError(f"{param} is {upload.size} bytes, over the limit of {limit} bytes", param)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError(f"{param} is over the limit of {limit} bytes", param)
        return data

    async def read_body(self, request: Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        """(fields, files) of a JSON object or a form. In a form, `a[b]` (how the OpenAI SDK sends an
        object in multipart) becomes a nested dict, and empty fields count as not given."""
        content_type = request.headers.get("content-type", "")
        if media_type(content_type) not in FORMS:
            raw = await request.body()
            if not raw:
                return {}, {}
            # Only a body declared JSON is parsed as JSON: a text/plain one (which a browser sends
            # cross-site without asking) is refused, never read.
            require_media_type(content_type, (JSON, *FORMS))
            body = parse_json(raw, "body")
            if not isinstance(body, dict):
                raise InvalidRequestError("request body must be a JSON object", "body")
            return body, {}
        try:
            form = await request.form()
        except AtelierError:
            raise  # over the size limit while reading
        except Exception as exc:
            raise InvalidRequestError(f"the form could not be read: {exc}", "body") from exc
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        try:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files[name] = await self.read(value, name)
                elif value == "":
                    continue
                elif match := _NESTED_FIELD.fullmatch(name):
                    nested = fields.setdefault(match[1], {})
                    if not isinstance(nested, dict):
                        raise InvalidRequestError(f"{match[1]} is given both as a value and as an object", match[1])
                    nested[match[2]] = value
                else:
                    fields[name] = value
        finally:
            await form.close()
        return fields, files

    async def load_image(self, sources: dict[str, Any]) -> tuple[str | None, bytes | None, Image.Image | None]:
        """The one given image source → (its key, or its bytes if it came with the request; the decoded image).

        `sources` maps each field name to its value: bytes (an upload), a reference string or
        ImageReference, or None. The image is decoded here so a bad one is a 400 naming its field.
        """
        given = {name: value for name, value in sources.items() if value is not None}
        if len(given) > 1:
            raise InvalidRequestError(f"give only one of {', '.join(given)}", list(given)[1])
        if not given:
            return None, None, None
        param, value = given.popitem()
        if isinstance(value, ImageReference):
            if (value.image_url is None) == (value.file_id is None):
                raise InvalidRequestError(f"{param} needs exactly one of image_url and file_id", param)
            value = value.image_url or value.file_id
        if isinstance(value, str):
            value = reference_key(value, param)
        key, data = (None, value) if isinstance(value, bytes) else (value, None)
        if key is not None:
            try:
                if not await asyncio.to_thread(self.readable, key):  # another owner's: as if missing
                    raise ObjectNotFoundError(key)
                data = await asyncio.to_thread(self.storage.get_bytes, key)
            except (ObjectNotFoundError, InvalidKeyError):
                raise InvalidRequestError(f"no stored output at {param} {key!r}", param) from None
        image = decode_image(data, param, max_pixels=self.max_upload_pixels)
        return key, (None if key else data), image

    async def store(self, data: bytes) -> str:
        """Jobs read their input from storage: an upload is stored once, then passed by key."""
        return await asyncio.to_thread(self.storage.put_bytes, f"uploads/{new_id('upload')}/image", data)


def unexpected_files(files: dict[str, bytes]) -> None:
    """A form's file fields left over once a route has taken its own: the first is the request's error."""
    if files:
        raise InvalidRequestError(f"unexpected file field {next(iter(files))!r}", next(iter(files)))


def reference_key(value: str, param: str) -> str | bytes:
    """A reference string → the storage key it names, or the bytes of a data: URL."""
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        if not header.endswith(";base64"):
            raise InvalidRequestError(f"{param} data: URLs must be base64 encoded", param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{param} is not valid base64", param) from None
    key = value
    if value.startswith(("http://", "https://", "/")):
        path = unquote(urlsplit(value).path)
        if "/v1/files/" not in path:
            raise InvalidRequestError(
                f"{param} must be a URL of this server's files (…/v1/files/outputs/…), a data: URL, "
                "or the storage key of an output", param)
        key = path.split("/v1/files/", 1)[1]
    try:
        validate_key(key)
    except InvalidKeyError:
        raise InvalidRequestError(f"{param} {value!r} is not a valid storage key", param) from None
    if not key.startswith(OUTPUTS_PREFIX):  # only generated outputs, never records or uploads
        raise InvalidRequestError(f"{param} must name a stored output (outputs/…); got {key!r}", param)
    return key


def body_schema(model) -> dict:
    """OpenAPI for a route that reads JSON or a multipart form itself (nested models inlined)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    schema = inline(schema)
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "multipart/form-data": {"schema": {"type": "object", "description": "The same fields as form fields, "
                                           "with the image as a file."}},
    }}}
