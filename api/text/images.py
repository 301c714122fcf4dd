"""Images a request brings to the language model: OpenAI image content parts in chat, and the
judge's images.

An image is inline (a `data:image/...;base64,` URL, or a judge item's `b64_json`) or a file of
this server: a stored output or dataset image, by its key (`outputs/...`, `datasets/...`), its
path (`/v1/files/<key>`) or the URL this server gave for it. A key is read from storage, as its
caller may (another owner's file is a 404, as everywhere), and every image goes to the engine as
a `data:` URL: the server never fetches a URL, and no URL reaches vLLM, which would.

Each image is checked here, so a bad one is a 4xx naming its field: too many bytes (413), not an
image or too many pixels (400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

from deployments.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from deployments.llm.vision import data_url
from deployments.media import decode_image
from storage.datasets import is_dataset_image_key
from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage, validate_key
from storage.keys import OUTPUTS_PREFIX

FILES_PATH = "/v1/files/"
# Content part types a chat message may hold: text, and images as `image_url`. Every other kind
# vLLM knows (audio_url, video_url, image_embeds, image_pil, input_image, ...) would have vLLM
# fetch a URL or deserialize data, and a part with a `uuid` names the engine's cached media.
TEXT_PART_TYPES = frozenset({"text", "refusal"})
MEDIA_PART_KEYS = frozenset({"image_url", "image_pil", "image_embeds", "audio_url", "input_audio", "audio_embeds",
                             "video_url", "video_embeds", "prompt_embeds", "input_image", "file", "uuid"})


def content_type(image: bytes) -> str:
    """The content type of an image decode_image read (PNG, JPEG or WebP), by its magic bytes."""
    if image.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if image[:4] == b"RIFF" and image[8:12] == b"WEBP":
        return "image/webp"
    return "image/png"


class ImageInputs:
    """Reads, checks and counts the images of one request."""

    def __init__(self, storage: Storage, readable: Callable[[str], bool], max_bytes: int, max_pixels: int,
                 max_images: int):
        self.storage = storage
        self.readable = readable  # whether the caller may read a stored file (FilesService.readable)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.max_images = max_images  # image parts one chat request may carry

    # --- one image -------------------------------------------------------------------------------

    def check(self, data: bytes, param: str) -> str:
        """`data` is an image within the limits: its content type; a 4xx naming `param` if not."""
        if len(data) > self.max_bytes:
            raise PayloadTooLargeError(f"{param} is {len(data)} bytes, over the limit of {self.max_bytes} bytes",
                                       param)
        decode_image(data, param, max_pixels=self.max_pixels)
        return content_type(data)

    def from_base64(self, text: str, param: str) -> bytes:
        if len(text) > self.max_bytes * 4 // 3 + 4:
            raise PayloadTooLargeError(f"{param} is over the limit of {self.max_bytes} bytes", param)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"{param} is not valid base64", param) from None

    async def from_key(self, key: str, param: str) -> bytes:
        """A stored output or dataset image the caller may read; anything else is a 404 naming `param`."""
        try:
            validate_key(key)
        except InvalidKeyError:
            raise InvalidRequestError(f"{param} {key!r} is not a valid storage key", param) from None
        if not (key.startswith(OUTPUTS_PREFIX) or is_dataset_image_key(key)):
            raise InvalidRequestError(f"{param} must name a stored output (outputs/…) or a dataset image "
                                      f"(datasets/<id>/images/…); got {key!r}", param)
        try:
            if not await asyncio.to_thread(self.readable, key):  # another owner's: as unknown as a missing one
                raise ObjectNotFoundError(key)
            return await asyncio.to_thread(self.storage.get_bytes, key)
        except (ObjectNotFoundError, InvalidKeyError, FileNotFoundError):
            raise NotFoundError(f"no file {key!r} ({param})", param) from None

    async def from_url(self, url: Any, param: str, base_url: str) -> tuple[bytes, str]:
        """An image part's URL → (the image, its content type). Only inline images and this server's
        own files; any other URL is refused, never fetched."""
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(f"{param} must be a data: URL or a file of this server", param)
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.startswith("data:image/") or not header.endswith(";base64"):
                raise InvalidRequestError(f"{param}: a data: URL must be a base64 image "
                                          "(data:image/png;base64,...)", param)
            data = self.from_base64(payload, param)
        else:
            data = await self.from_key(self.key_of(url, param, base_url), param)
        return data, await asyncio.to_thread(self.check, data, param)

    @staticmethod
    def key_of(url: str, param: str, base_url: str) -> str:
        """The storage key a reference names: the key itself, `/v1/files/<key>`, or that path on
        this server's own base URL (what an Images response's `url` holds)."""
        parts = urlsplit(url)
        if not parts.scheme and not parts.netloc:
            path = unquote(parts.path)
            return path[len(FILES_PATH):] if path.startswith(FILES_PATH) else path
        own = urlsplit(base_url)
        if (parts.scheme, parts.netloc) == (own.scheme, own.netloc):
            path = unquote(parts.path)
            prefix = own.path.rstrip("/") + FILES_PATH
            if path.startswith(prefix):
                return path[len(prefix):]
        raise InvalidRequestError(
            f"{param}: image URLs outside this server are not fetched; send the image inline as a data: URL, "
            "or name a stored output or dataset image (outputs/…, /v1/files/…)", param)

    # --- chat messages ---------------------------------------------------------------------------

    async def resolve_messages(self, messages: list, base_url: str) -> int:
        """Check every content part of a chat's messages and make each image part a data: URL the
        engine decodes itself (in place). Returns the number of images."""
        images = []  # (param, the part's image_url object, the url)
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                continue
            for number, part in enumerate(content):
                param = f"messages.{index}.content.{number}"
                if not isinstance(part, dict):
                    continue  # a plain string part is text
                kind = part.get("type")
                if kind == "image_url":
                    extra = (set(part) - {"type", "image_url"}) & MEDIA_PART_KEYS
                    if extra:
                        raise InvalidRequestError(f"{param}.{min(extra)} is not accepted here", f"{param}.{min(extra)}")
                    image_url = part.get("image_url")
                    if not isinstance(image_url, dict):
                        raise InvalidRequestError(f"{param}.image_url must be an object with a url",
                                                  f"{param}.image_url")
                    images.append((f"{param}.image_url.url", part, image_url.get("url")))
                elif kind in TEXT_PART_TYPES:
                    extra = set(part) & MEDIA_PART_KEYS
                    if extra:
                        raise InvalidRequestError(f"{param}.{min(extra)} is not accepted in a {kind} part",
                                                  f"{param}.{min(extra)}")
                else:
                    raise InvalidRequestError(f"{param}.type must be 'text' or 'image_url' here; got {kind!r}",
                                              f"{param}.type")
        if len(images) > self.max_images:
            raise InvalidRequestError(f"the messages hold {len(images)} images; at most {self.max_images} per "
                                      "request here", images[self.max_images][0])
        loaded = await asyncio.gather(*(self.from_url(url, param, base_url) for param, _, url in images))
        for (_, part, _), (data, content_type) in zip(images, loaded):
            part["image_url"] = {**part["image_url"], "url": data_url(data, content_type)}
        return len(images)
