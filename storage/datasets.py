"""Datasets: named, versioned collections of images with captions, for training.

Layout under the storage root (``dataset_prefix`` in :mod:`storage.keys`)::

    datasets/<id>/dataset.json              name, description, trigger word, default license
    datasets/<id>/images/<sha256>.<ext>     image files, stored once; all versions share them
    datasets/<id>/v<N>/manifest.parquet     version N: every row of version N-1 plus the new ones
    datasets/<id>/_captions/<fp>/<part>.json  captions a captioning job made but has not committed yet
    datasets/_names/<name>.json             name claim: {"id": ...}

A manifest has one row per image: ``key`` (storage key of the file), ``width``, ``height``,
``caption``, ``tags`` (list<string>), ``source``, ``license``, ``sha256``, ``filename`` (as
uploaded) and ``size_bytes``. Its Parquet schema metadata holds the version's summary.

Adding images never rewrites a version: it writes the image files (content-addressed, so a
file another version already has is not written again), then *claims* version N+1 by creating
its manifest only if no object is there yet:

* local: the manifest is written to a temp file and hard-linked to its name; ``link(2)`` fails
  if the name exists, and a reader never sees a partial file;
* S3: one ``PutObject`` with ``If-None-Match: *`` (S3 conditional writes; s3fs
  ``pipe_file(mode="create")``), which S3 answers 412 if the key exists.

Captions made by the language model (:meth:`DatasetStore.commit_captions`) land the same way: a
new version, claimed with the same put, rebuilt on the newest version if another writer claimed
it first; older versions keep their captions.

:meth:`storage.fs.Storage.put_if_absent` is that claim. A writer that loses it re-reads the
newest version, re-checks duplicates against it and claims the next number, so two concurrent
adds never lose rows. Image files written by an add that is then abandoned (a cancelled import) stay as unreferenced
files under ``images/``; a later add of the same image reuses them.

Names and ids are validated with :func:`storage.keys.validate_id` (no ``/``, no ``..``), and
archive entries with ``..`` or absolute paths are refused, so nothing escapes the root.

What an import may read: a prefix import reads only a configured import root
(:func:`check_prefix_allowed`), and never Atelier's own data: in the storage root only
``imports/`` is importable, whatever the configuration; local files that link out of the
imported folder are rejected. Generated images come in only as the outputs of jobs
(:meth:`DatasetStore.add_job_outputs`). Every image's pixel count is read from its header and
checked against ``max_pixels`` before it is decoded (uploads, zip members, prefix and URL
imports alike), and decodes share one pixel budget (:data:`DECODE_BUDGET`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import stat
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from storage.fs import InvalidKeyError, ObjectNotFoundError, Storage, validate_key, validate_prefix
from storage.jobs import JobNotFoundError, JobStore
from storage.keys import (DATASETS_PREFIX, IMPORTS_PREFIX, OUTPUTS_PREFIX, dataset_prefix, new_id, owner_tag,
                          validate_id)
from storage.url_import import DEFAULT_MAX_PIXELS, DatasetImportConfig, fetch_urls

__all__ = [
    "MANIFEST_SCHEMA",
    "DEFAULT_LICENSE",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetExistsError",
    "InvalidDatasetInputError",
    "DatasetTooLargeError",
    "DatasetBusyError",
    "DatasetConflictError",
    "EditResult",
    "CaptionCheckpoint",
    "CaptionCommit",
    "image_content_type",
    "UrlItem",
    "credits_csv",
    "ImageItem",
    "Rejection",
    "AddResult",
    "VersionInfo",
    "DatasetInfo",
    "DatasetStore",
    "DatasetWriter",
    "expand_zip",
    "expand_uploads",
    "inspect_image",
    "pair_captions",
    "check_prefix_allowed",
    "is_dataset_image_key",
]

DEFAULT_LICENSE = "unknown"
MAX_NAME_LENGTH = 100
MAX_CAPTION_LENGTH = 10_000
MAX_TAGS = 100
MAX_TAG_LENGTH = 200
MAX_FILENAME_LENGTH = 4096  # URLs are names too
DEFAULT_MAX_IMAGE_BYTES = 50 * 1024 * 1024
# What the zips of one upload may expand to. The API sets it from its upload limit instead
# (DatasetImportConfig.max_zip_expanded_bytes); this default is for the CLI and Python callers.
DEFAULT_MAX_EXPANDED_BYTES = 1024**3
_ZIP_CHUNK = 1024 * 1024
MAX_CLAIM_ATTEMPTS = 100
_PREFIX_CHUNK = 32

NAMES_PREFIX = f"{DATASETS_PREFIX}_names/"
_META_KEY = b"atelier.dataset"
# format PIL reports -> file extension; what training readers can decode
_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_CONTENT_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif",
                  "bmp": "image/bmp", "tiff": "image/tiff"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("caption", pa.string()),
    ("tags", pa.list_(pa.string())),
    ("source", pa.string()),
    ("license", pa.string()),
    ("sha256", pa.string()),
    ("filename", pa.string()),
    ("size_bytes", pa.int64()),
    # JSON: who made the image and where it came from (collected images: source, photographer,
    # profile and page URLs, licence URL); null for images without one. Manifests written before
    # this column existed read with it null (DatasetStore.manifest).
    ("attribution", pa.string()),
])


# --- errors ----------------------------------------------------------------------------------


class DatasetError(Exception):
    """Base class; ``param`` names the offending argument where there is one."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class DatasetNotFoundError(DatasetError, LookupError):
    """No such dataset (or version)."""


class DatasetExistsError(DatasetError):
    """A dataset with this name exists."""


class InvalidDatasetInputError(DatasetError, ValueError):
    """A bad name, archive, prefix or confirmation."""


class DatasetTooLargeError(InvalidDatasetInputError):
    """An upload over a size limit (a zip that expands to too much); the API answers 413."""


class DatasetBusyError(DatasetError):
    """Could not claim a new version after many attempts (a storm of concurrent adds)."""


class DatasetConflictError(DatasetError):
    """An edit of a version that is no longer the latest; the API answers 409."""


# --- models ----------------------------------------------------------------------------------


@dataclass
class ImageItem:
    """One image to add. ``license=None`` takes the dataset's default license."""

    filename: str
    data: bytes
    caption: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = "upload"
    license: str | None = None
    attribution: dict[str, Any] | None = None


@dataclass
class UrlItem:
    """One image to fetch (see :meth:`DatasetStore.add_from_url_items`); ``filename`` names it in
    the result (duplicates, rejections) and the manifest."""

    url: str
    filename: str
    caption: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = "url"
    license: str | None = None
    attribution: dict[str, Any] | None = None


class Rejection(BaseModel):
    filename: str
    reason: str


class AddResult(BaseModel):
    dataset_id: str
    version: int = Field(description="The version holding the images (unchanged when nothing was added).")
    added: int
    images: int = Field(description="Images in that version.")
    duplicates: list[str] = Field(default_factory=list, description="Names skipped as already present (same sha256).")
    rejected: list[Rejection] = Field(default_factory=list)


class EditResult(BaseModel):
    dataset_id: str
    version: int = Field(description="The new version.")
    base_version: int = Field(description="The version the edit was made on.")
    images: int
    removed: int
    captions_changed: int
    tags_changed: int


class CaptionCommit(BaseModel):
    """What :meth:`DatasetStore.commit_captions` wrote."""

    dataset_id: str
    version: int = Field(description="The new version (the latest, unchanged, when no caption changed).")
    base_version: int = Field(description="The version the captions were made on.")
    images: int = Field(description="Images in that version.")
    captioned: int = Field(description="Images whose caption the commit changed.")
    conflicts: list[str] = Field(default_factory=list, description=(
        "Images (sha256) whose caption was changed by someone else, or that were removed, since the base "
        "version: left as they are now."))


class VersionInfo(BaseModel):
    version: int
    images: int
    added: int
    total_bytes: int
    created_at: float


class DatasetInfo(BaseModel):
    id: str
    name: str
    description: str = ""
    trigger_word: str | None = None
    license: str = DEFAULT_LICENSE
    created_at: float
    latest_version: int = Field(0, description="0 until images are added.")
    images: int = 0
    total_bytes: int = 0
    versions: list[VersionInfo] = Field(default_factory=list, description="Filled by get(), not list().")
    owner: str | None = Field(None, description="The tenant that made it (None: open mode); only it changes it.")
    public: bool = Field(False, description="Readable (and trainable on) by every key; changed only by its owner.")


# --- validation helpers ----------------------------------------------------------------------


def _valid_name(name: object) -> str:
    try:
        validate_id(name, "dataset name")
    except ValueError as exc:
        raise InvalidDatasetInputError(str(exc), "name") from None
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidDatasetInputError(f"dataset name is longer than {MAX_NAME_LENGTH} characters", "name")
    return name


def _valid_text(value: object, what: str, limit: int, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidDatasetInputError(f"{what} must be a string", what)
    if len(value) > limit:
        raise InvalidDatasetInputError(f"{what} is longer than {limit} characters", what)
    return value


def _item_problem(item: ImageItem, max_bytes: int) -> str | None:
    """Why ``item``'s fields are unusable, or None."""
    if not isinstance(item.filename, str) or not item.filename or len(item.filename) > MAX_FILENAME_LENGTH:
        return "invalid file name"
    if _CONTROL.search(item.filename):
        return "file name contains control characters"
    if not isinstance(item.data, (bytes, bytearray, memoryview)) or not item.data:
        return "empty file"
    if len(item.data) > max_bytes:
        return f"file is {len(item.data)} bytes, over the limit of {max_bytes}"
    if not isinstance(item.caption, str) or len(item.caption) > MAX_CAPTION_LENGTH:
        return f"caption must be text of at most {MAX_CAPTION_LENGTH} characters"
    if (not isinstance(item.tags, (list, tuple)) or len(item.tags) > MAX_TAGS
            or any(not isinstance(t, str) or not t or len(t) > MAX_TAG_LENGTH for t in item.tags)):
        return f"tags must be at most {MAX_TAGS} non-empty strings of at most {MAX_TAG_LENGTH} characters"
    if not isinstance(item.source, str) or len(item.source) > 4096:
        return "source must be a string of at most 4096 characters"
    if item.license is not None and (not isinstance(item.license, str) or len(item.license) > 200):
        return "license must be a string of at most 200 characters"
    return None


class _PixelBudget:
    """Pixels being decoded at once, across threads: a full decode takes about 4 bytes a pixel,
    so this bounds the memory of concurrent decodes whatever the thread counts (8 writer
    threads per add, several adds at once). A decode larger than the whole budget waits until
    it can run alone."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = max(1, min(pixels, self.capacity))
        with self._cond:
            self._cond.wait_for(lambda: self.used + pixels <= self.capacity)
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


# two images at DEFAULT_MAX_PIXELS (4096 x 4096) decode at once: about 128 MiB
DECODE_BUDGET = _PixelBudget(2 * DEFAULT_MAX_PIXELS)


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, int, int]:
    """``(extension, width, height)`` of an image that fully decodes; ValueError saying why not.

    The size comes from the header (``Image.open`` reads nothing else), so an image over
    ``max_pixels`` is refused before a byte of it is decoded: a 100 KB PNG can declare
    8192 x 8192 and inflate to 256 MB. The decode of an image within the limit waits for room
    in :data:`DECODE_BUDGET`.

    Width and height are as displayed (EXIF orientation applied), as the reader decodes them.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            ext = _FORMATS.get(image.format or "")
            if ext is None:
                raise ValueError(f"unsupported image format {image.format}")
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(f"image is {width}x{height}, over the limit of {max_pixels} pixels")
            with DECODE_BUDGET.hold(width * height):
                image.load()  # a full decode: truncated or corrupt data fails here, not in training
                orientation = image.getexif().get(0x0112, 1)  # a PNG's may follow its pixels: after load
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        # PIL's own bomb check (at open, past 2 x Image.MAX_IMAGE_PIXELS) only backs ours up
        raise ValueError("not a readable image" if isinstance(exc, UnidentifiedImageError)
                         else f"image is over the limit of {max_pixels} pixels") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"corrupt image: {exc}") from None
    if orientation in (5, 6, 7, 8):  # rotated 90 or 270 degrees
        width, height = height, width
    return ext, width, height


def image_content_type(key: str) -> str:
    """The content type of a dataset image file, from its extension (as the store names them)."""
    return _CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def is_dataset_image_key(key: str) -> bool:
    """Whether ``key`` is an image file of some dataset or its thumbnail (what a files route may serve)."""
    parts = key.split("/")
    return len(parts) == 4 and f"{parts[0]}/" == DATASETS_PREFIX and parts[2] in ("images", "thumbs")


THUMBNAIL_PX = 256  # the longer side of a dataset image's thumbnail


# --- archives and captions -------------------------------------------------------------------


def _check_member_name(name: str, archive: str) -> str:
    bad = (not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name
           or re.match(r"^[A-Za-z]:", name) or any(seg == ".." for seg in name.split("/")))
    if bad:
        raise InvalidDatasetInputError(
            f"{archive}: entry {name!r} is an absolute path or escapes the archive; nothing was added", "files")
    return name


def expand_zip(data: bytes | str | os.PathLike, name: str = "archive.zip", *, max_files: int = 10_000,
               max_total_bytes: int = DEFAULT_MAX_EXPANDED_BYTES, max_entry_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
               ) -> tuple[list[tuple[str, bytes]], list[Rejection]]:
    """``(entry path, bytes)`` of the files in a zip, and entries that could not be read.

    Refuses the whole archive if any entry is absolute or has a ``..`` segment (zip-slip), if
    it has more than ``max_files`` files, or if it expands to more than ``max_total_bytes``
    (:class:`DatasetTooLargeError`). An entry over ``max_entry_bytes`` is rejected by name and
    the rest still lands. Sizes are checked twice, because a zip's declared sizes can lie: the
    declared ``file_size`` before anything is decompressed, then the bytes actually inflated,
    read in chunks and stopped as soon as a limit is passed, so a small zip of zeros never
    becomes a large allocation. Nested zips are not expanded (they are rejected as non-images).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidDatasetInputError(f"{name} is not a readable zip archive: {exc}", "files") from None
    with archive:
        infos = archive.infolist()
        for info in infos:  # check every name before reading anything
            _check_member_name(info.filename, name)
        infos = [i for i in infos if not i.is_dir() and not _hidden(i.filename)]
        if len(infos) > max_files:
            raise InvalidDatasetInputError(f"{name} has {len(infos)} files, over the limit of {max_files}", "files")
        declared = sum(i.file_size for i in infos)  # what the archive claims: refused before inflating any of it
        if declared > max_total_bytes:
            raise DatasetTooLargeError(
                f"{name} expands to {declared} bytes, over the limit of {max_total_bytes} bytes", "files")
        files, rejected, total = [], [], 0
        for info in infos:
            if info.file_size > max_entry_bytes:  # declared too big: not even decompressed
                rejected.append(Rejection(filename=info.filename, reason=(
                    f"file is {info.file_size} bytes, over the limit of {max_entry_bytes}")))
                continue
            try:
                content = _read_entry(archive, info, max_entry_bytes, max_total_bytes - total)
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
                rejected.append(Rejection(filename=info.filename, reason=f"cannot read archive entry: {exc}"))
                continue
            total += len(content)  # every inflated byte counts, kept or not: it bounds the work too
            if total > max_total_bytes:
                raise DatasetTooLargeError(
                    f"{name} expands to more than the limit of {max_total_bytes} bytes", "files")
            if len(content) > max_entry_bytes:
                rejected.append(Rejection(filename=info.filename, reason=(
                    f"file is over the limit of {max_entry_bytes} bytes")))
                continue
            files.append((info.filename, content))
        return files, rejected


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_entry_bytes: int, budget: int) -> bytes:
    """The entry's bytes, or its first ``min(max_entry_bytes, budget) + 1`` bytes if it has more
    (the caller tells which limit was passed from the length)."""
    limit = min(max_entry_bytes, max(budget, 0)) + 1
    chunks, size = [], 0
    with archive.open(info) as member:
        while size < limit:
            chunk = member.read(min(_ZIP_CHUNK, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    return b"".join(chunks)


def expand_uploads(files: Iterable[tuple[str, bytes]], *, max_total_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
                   max_entry_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                   ) -> tuple[list[tuple[str, bytes]], list[Rejection]]:
    """Uploaded files with each zip replaced by its entries (one level deep).

    All the zips of one upload share ``max_total_bytes`` of expanded content (see :func:`expand_zip`).
    """
    flat: list[tuple[str, bytes]] = []
    rejected: list[Rejection] = []
    expanded = 0
    for name, data in files:
        if _is_zip(name, data):
            try:
                entries, bad = expand_zip(data, name, max_total_bytes=max_total_bytes - expanded,
                                          max_entry_bytes=max_entry_bytes)
            except DatasetTooLargeError:
                raise DatasetTooLargeError(f"the zip archives in this upload expand to more than the limit of "
                                           f"{max_total_bytes} bytes (at {name})", "files") from None
            expanded += sum(len(content) for _, content in entries)
            flat += entries
            rejected += bad
        else:
            flat.append((name, data))
    return flat, rejected


def _hidden(path: str) -> bool:
    # macOS resource forks and dot files are noise in image archives
    return path.startswith("__MACOSX/") or any(seg.startswith(".") for seg in path.split("/"))


def _stem(path: str) -> str:
    head, _, base = path.rpartition("/")
    base = base.rsplit(".", 1)[0] if "." in base else base
    return f"{head}/{base}" if head else base


def _is_zip(name: str, data: bytes) -> bool:
    return name.lower().endswith(".zip") or data[:4] == b"PK\x03\x04"


def pair_captions(files: Iterable[tuple[str, bytes]], captions: Mapping[str, str] | None = None, *,
                  tags: list[str] | None = None, source: str = "upload", license: str | None = None,
                  ) -> tuple[list[ImageItem], list[Rejection]]:
    """Images and ``.txt`` files -> ImageItems, a caption from the ``.txt`` of the same stem.

    ``captions`` maps a file name (or its stem) to a caption and wins over a ``.txt``. Caption
    files without an image are reported as rejected.
    """
    text_captions: dict[str, str] = {}
    images: list[tuple[str, bytes]] = []
    rejected: list[Rejection] = []
    for name, data in files:
        if name.lower().endswith(".txt"):
            try:
                text_captions[_stem(name)] = data.decode("utf-8-sig").strip()
            except UnicodeDecodeError:
                rejected.append(Rejection(filename=name, reason="caption file is not UTF-8 text"))
        else:
            images.append((name, data))
    captions = dict(captions or {})
    items = []
    used = set()
    for name, data in images:
        stem = _stem(name)
        base = name.rsplit("/", 1)[-1]
        caption = next((captions[k] for k in (name, base, stem, _stem(base)) if k in captions),
                       text_captions.get(stem, ""))
        used.add(stem)
        items.append(ImageItem(filename=name, data=data, caption=caption, tags=list(tags or []),
                               source=source, license=license))
    for stem in text_captions.keys() - used:
        rejected.append(Rejection(filename=f"{stem}.txt", reason="caption file has no image of the same name"))
    return items, rejected


def _is_relative(prefix: str) -> bool:
    return "://" not in prefix and not os.path.isabs(prefix)


def _under(location: str, folder: str) -> bool:
    """Whether ``location`` is ``folder`` or inside it (both normalized, no trailing ``/``)."""
    return location == folder or location.startswith(folder + "/")


def _refuse_atelier_data(prefix: str, storage_root: str | None) -> None:
    """Refuse a prefix that reaches Atelier's own data: in the storage root, anything but ``imports/``.

    Storage prefixes are plain string prefixes (``"up"`` lists ``uploads/...``), so a key prefix
    must start with ``imports/`` itself. A path or URL must not be the storage root, hold it, or
    lie inside it other than under its ``imports/``. Applied whatever the configuration says.
    """
    if _is_relative(prefix):
        try:
            validate_prefix(prefix)
        except InvalidKeyError as exc:
            raise InvalidDatasetInputError(str(exc), "prefix") from None
        if not prefix.startswith(IMPORTS_PREFIX):
            raise InvalidDatasetInputError(
                f"prefix {prefix!r} is Atelier's own storage: a prefix import reads only under "
                f"{IMPORTS_PREFIX!r} in the storage root, or a configured location outside it", "prefix")
        return
    if storage_root is None:
        return
    target, root = _normal_location(prefix).rstrip("/"), _normal_location(storage_root).rstrip("/")
    if _under(root, target) or (_under(target, root) and not _under(target, f"{root}/{IMPORTS_PREFIX.rstrip('/')}")):
        raise InvalidDatasetInputError(
            f"prefix {prefix!r} reaches Atelier's own storage ({storage_root}); only its "
            f"{IMPORTS_PREFIX!r} may be imported from", "prefix")


def check_prefix_allowed(prefix: str, allowed_prefixes: Iterable[str] = (), *,
                         storage_root: str | None = None) -> str:
    """For API imports: ``prefix`` must lie under a configured import root (``allowed_prefixes``,
    i.e. ``dataset_import.allowed_prefixes``), and never in Atelier's own data.

    * A key prefix in the storage root must be under ``imports/`` (:data:`storage.keys.IMPORTS_PREFIX`)
      and under a relative entry of ``allowed_prefixes`` (``"imports/"`` allows all of it).
    * A path or URL (``/data/photos/``, ``s3://bucket/photos/``) must be under an absolute entry,
      and, given ``storage_root``, not reach into the storage root other than its ``imports/``.

    Nothing is importable until an operator configures a root, and an entry that names Atelier's
    data (``uploads/``, ``outputs/``, ``datasets/``...) allows nothing: job outputs come in only
    as outputs of jobs (:meth:`DatasetStore.add_job_outputs`).

    Returns the prefix (local paths made real, so a symlink cannot leave an allowed folder).
    """
    if not isinstance(prefix, str) or not prefix.strip():
        raise InvalidDatasetInputError("prefix must be a non-empty string", "prefix")
    allowed_prefixes = [a for a in allowed_prefixes if isinstance(a, str) and a.strip()]
    if _is_relative(prefix):
        try:
            validate_prefix(prefix)
        except InvalidKeyError as exc:
            raise InvalidDatasetInputError(str(exc), "prefix") from None
        _refuse_atelier_data(prefix, storage_root)
        for allowed in allowed_prefixes:
            if not _is_relative(allowed):
                continue
            base = allowed.rstrip("/") + "/"
            if base.startswith(IMPORTS_PREFIX) and prefix.startswith(base):
                return prefix
        raise InvalidDatasetInputError(
            f"prefix {prefix!r} is not under a configured import root (dataset_import.allowed_prefixes: "
            f"{allowed_prefixes})", "prefix")
    target = _normal_location(prefix)
    _refuse_atelier_data(prefix, storage_root)
    for allowed in allowed_prefixes:
        if _is_relative(allowed):
            continue
        if _under(target.rstrip("/"), _normal_location(allowed).rstrip("/")):
            return target if "://" not in target else prefix
    raise InvalidDatasetInputError(
        f"prefix {prefix!r} is not under a configured import root (dataset_import.allowed_prefixes: "
        f"{allowed_prefixes})", "prefix")


def _normal_location(location: str) -> str:
    """A local path made real, or ``scheme://rest`` with the scheme's canonical name (``s3a`` is
    ``s3``, ``local`` is a path), so two spellings of one place compare equal."""
    if "::" in location:  # fsspec URL chaining (simplecache::s3://...) would hide the real location
        raise InvalidDatasetInputError(f"prefix {location!r}: chained fsspec URLs are not allowed", "prefix")
    if "://" in location:
        scheme, _, rest = location.partition("://")
        scheme = scheme.lower()
        if scheme in ("file", "local"):
            location = rest
        else:
            if any(seg in (".", "..") for seg in rest.split("/")):
                raise InvalidDatasetInputError(f"prefix {location!r} has '.' or '..' segments", "prefix")
            return f"{'s3' if scheme == 's3a' else scheme}://{rest}"
    return os.path.realpath(location)


# --- the store -------------------------------------------------------------------------------


def _empty_manifest() -> pa.Table:
    return MANIFEST_SCHEMA.empty_table()


class DatasetStore:
    """Create, fill, read and delete datasets in a :class:`Storage`. Methods block."""

    def __init__(self, storage: Storage, *, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES):
        self.storage = storage
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels
        self.max_expanded_bytes = max_expanded_bytes

    def __reduce__(self):
        return (type(self), (self.storage,), {"max_image_bytes": self.max_image_bytes,
                                               "max_pixels": self.max_pixels,
                                               "max_expanded_bytes": self.max_expanded_bytes})

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def _info_key(dataset_id: str) -> str:
        return f"{dataset_prefix(dataset_id)}dataset.json"

    @staticmethod
    def manifest_key(dataset_id: str, version: int) -> str:
        return f"{dataset_prefix(dataset_id, version)}manifest.parquet"

    @staticmethod
    def image_key(dataset_id: str, sha256: str, ext: str) -> str:
        return f"{dataset_prefix(dataset_id)}images/{sha256}.{ext}"

    @staticmethod
    def thumbnail_key(dataset_id: str, sha256: str) -> str:
        return f"{dataset_prefix(dataset_id)}thumbs/{sha256}.jpg"

    # -- datasets ---------------------------------------------------------------------------

    @staticmethod
    def _name_key(name: str, owner: str | None) -> str:
        """Names are unique per owner (one tenant's names say nothing about another's)."""
        tag = owner_tag(owner)
        return f"{NAMES_PREFIX}{tag + '/' if tag else ''}{name}.json"

    def create(self, name: str, description: str = "", trigger_word: str | None = None,
               license: str = DEFAULT_LICENSE, owner: str | None = None, public: bool = False) -> DatasetInfo:
        """A new, empty dataset (version 0). DatasetExistsError if the owner has one of that name."""
        _valid_name(name)
        _valid_text(description, "description", 2000)
        _valid_text(trigger_word, "trigger_word", 100, optional=True)
        _valid_text(license, "license", 200)
        if trigger_word is not None and (not trigger_word.strip() or _CONTROL.search(trigger_word)):
            raise InvalidDatasetInputError("trigger_word must be non-blank text on one line", "trigger_word")
        info = DatasetInfo(id=new_id("ds"), name=name, description=description, trigger_word=trigger_word,
                           license=license, created_at=time.time(), owner=owner, public=public)
        name_key = self._name_key(name, owner)
        if not self.storage.put_if_absent(name_key, json.dumps({"id": info.id}).encode(), "application/json"):
            raise DatasetExistsError(f"a dataset named {name!r} exists", "name")
        try:
            self.storage.put_json(self._info_key(info.id), info.model_dump(
                mode="json", include={"id", "name", "description", "trigger_word", "license", "created_at", "owner",
                                      "public"}))
        except BaseException:
            self.storage.delete(name_key)
            raise
        return info

    def _read_info(self, dataset_id: str) -> DatasetInfo:
        try:
            validate_id(dataset_id, "dataset id")
            return DatasetInfo.model_validate(self.storage.get_json(self._info_key(dataset_id)))
        except (ValueError, ObjectNotFoundError):
            raise DatasetNotFoundError(f"no dataset with id {dataset_id!r}", "dataset_id") from None

    def owner_of(self, dataset_id: str) -> tuple[str | None, bool]:
        """(owner, public) of a dataset; DatasetNotFoundError if there is none."""
        info = self._read_info(dataset_id)
        return info.owner, info.public

    def resolve(self, id_or_name: str, owner: str | None = None) -> str:
        """The id of a dataset given its id or its name (the owner's names; for CLIs)."""
        try:
            return self._read_info(id_or_name).id
        except DatasetNotFoundError:
            pass
        try:
            _valid_name(id_or_name)
            return self.storage.get_json(self._name_key(id_or_name, owner))["id"]
        except (InvalidDatasetInputError, ObjectNotFoundError, KeyError, TypeError):
            raise DatasetNotFoundError(f"no dataset with id or name {id_or_name!r}", "dataset_id") from None

    def list(self) -> list[DatasetInfo]:
        """All datasets, newest first, with their latest version's counts (no per-version list)."""
        out = []
        for entry in self.storage.list(DATASETS_PREFIX, recursive=False):
            dataset_id = entry[len(DATASETS_PREFIX):].rstrip("/")
            if not entry.endswith("/") or entry == NAMES_PREFIX:
                continue
            try:
                info = self._read_info(dataset_id)
            except DatasetNotFoundError:
                continue  # being created or deleted
            versions = self.versions(dataset_id)
            if versions:
                self._fill_latest(info, self._version_info(dataset_id, versions[-1]))
            out.append(info)
        return sorted(out, key=lambda i: i.created_at, reverse=True)

    def get(self, dataset_id: str) -> DatasetInfo:
        """The dataset with every version's counts and sizes."""
        info = self._read_info(dataset_id)
        info.versions = [self._version_info(dataset_id, v) for v in self.versions(dataset_id)]
        if info.versions:
            self._fill_latest(info, info.versions[-1])
        return info

    @staticmethod
    def _fill_latest(info: DatasetInfo, latest: VersionInfo) -> None:
        info.latest_version, info.images, info.total_bytes = latest.version, latest.images, latest.total_bytes

    def delete(self, dataset_id: str, confirm: str | None) -> int:
        """Delete the dataset, all versions and files. ``confirm`` must be its name (the id is in
        the request already, so it would confirm nothing). Returns how many objects were deleted."""
        info = self._read_info(dataset_id)
        if confirm != info.name:
            raise InvalidDatasetInputError(
                f"to delete dataset {info.id!r}, confirm with its name {info.name!r}", "confirm")
        # info first: the dataset disappears from get/list before its files go
        self.storage.delete(self._info_key(dataset_id))
        n = self.storage.delete_prefix(dataset_prefix(dataset_id)) + 1
        self.storage.delete(self._name_key(info.name, info.owner))  # the name is free once all is gone
        return n

    # -- versions ---------------------------------------------------------------------------

    def versions(self, dataset_id: str) -> list[int]:
        """Version numbers with a manifest, ascending (empty for a new dataset)."""
        prefix = dataset_prefix(dataset_id)
        pattern = re.compile(rf"^{re.escape(prefix)}v(\d+)/manifest\.parquet$")
        found = (pattern.match(k) for k in self.storage.list(f"{prefix}v"))
        return sorted(int(m.group(1)) for m in found if m)

    def _version_info(self, dataset_id: str, version: int) -> VersionInfo:
        with self.storage.open(self.manifest_key(dataset_id, version)) as f:
            meta = pq.read_metadata(f)  # the footer only
        summary = json.loads((meta.metadata or {}).get(_META_KEY, b"{}"))
        return VersionInfo(version=version, images=meta.num_rows, added=summary.get("added", 0),
                           total_bytes=summary.get("total_bytes", 0), created_at=summary.get("created_at", 0.0))

    def manifest(self, dataset_id: str, version: int | None = None) -> pa.Table:
        """The manifest of ``version`` (default: latest; 0: the empty initial version)."""
        self._read_info(dataset_id)
        if version is None:
            versions = self.versions(dataset_id)
            version = versions[-1] if versions else 0
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidDatasetInputError(f"version must be a non-negative integer, got {version!r}", "version")
        if version == 0:
            return _empty_manifest()
        try:
            data = self.storage.get_bytes(self.manifest_key(dataset_id, version))
        except ObjectNotFoundError:
            raise DatasetNotFoundError(f"dataset {dataset_id!r} has no version {version}", "version") from None
        table = pq.read_table(pa.BufferReader(data))
        for column in MANIFEST_SCHEMA:  # a manifest from before a column was added: null there
            if column.name not in table.column_names:
                table = table.append_column(column, pa.nulls(table.num_rows, column.type))
        return table

    def _latest(self, dataset_id: str) -> tuple[int, pa.Table]:
        versions = self.versions(dataset_id)
        if not versions:
            return 0, _empty_manifest()
        return versions[-1], self.manifest(dataset_id, versions[-1])

    # -- adding -----------------------------------------------------------------------------

    def writer(self, dataset_id: str) -> "DatasetWriter":
        """Stream images in with ``add``; ``commit`` makes them one new version."""
        return DatasetWriter(self, self._read_info(dataset_id))

    def add_images(self, dataset_id: str, items: Iterable[ImageItem],
                   rejected: Iterable[Rejection] = ()) -> AddResult:
        """Add ``items`` as one new version. Duplicates (by sha256, also within ``items``) are
        skipped and corrupt images rejected, each reported by name; the rest lands.
        ``rejected`` carries rejections found earlier (e.g. by :func:`pair_captions`)."""
        writer = self.writer(dataset_id)
        writer.rejected.extend(rejected)
        writer.add_many(items)
        return writer.commit()

    def add_files(self, dataset_id: str, files: Iterable[tuple[str, bytes]],
                  captions: Mapping[str, str] | None = None, *, tags: list[str] | None = None,
                  source: str = "upload", license: str | None = None) -> AddResult:
        """Add uploaded files: images, same-stem ``.txt`` captions, zips (expanded; a zip with an
        escaping entry is refused whole, before anything is added)."""
        self._read_info(dataset_id)
        flat, unreadable = expand_uploads(files, max_total_bytes=self.max_expanded_bytes,
                                          max_entry_bytes=self.max_image_bytes)
        items, rejected = pair_captions(flat, captions, tags=tags, source=source, license=license)
        return self.add_images(dataset_id, items, unreadable + rejected)

    def add_zip(self, dataset_id: str, archive: bytes | str | os.PathLike, *, tags: list[str] | None = None,
                source: str | None = None, license: str | None = None) -> AddResult:
        """Add a zip of images with same-stem ``.txt`` captions."""
        name = "archive.zip" if isinstance(archive, (bytes, bytearray)) else os.path.basename(os.fspath(archive))
        self._read_info(dataset_id)
        entries, unreadable = expand_zip(archive, name, max_total_bytes=self.max_expanded_bytes,
                                         max_entry_bytes=self.max_image_bytes)
        items, rejected = pair_captions(entries, tags=tags, source=source or f"zip:{name}", license=license)
        return self.add_images(dataset_id, items, unreadable + rejected)

    def add_from_prefix(self, dataset_id: str, prefix: str, storage_options: dict | None = None, *,
                        tags: list[str] | None = None, license: str | None = None,
                        max_files: int = 100_000,
                        progress: Callable[[int, int], None] | None = None) -> AddResult:
        """Add every image under ``prefix`` with same-stem ``.txt`` captions.

        ``prefix`` is a key prefix under ``imports/`` in this storage root (``imports/batch1/``),
        or an absolute local path or ``s3://``/``file://`` URL read through fsspec with
        ``storage_options`` (API callers check it against the configured import roots with
        :func:`check_prefix_allowed` first). Atelier's own data (the rest of the storage root)
        is refused whoever calls. Local files are read only if their real path is inside the
        prefix's real folder: a symlink out of it is rejected by name, and linked folders are
        not walked.
        ``progress(done, total)`` is called after each file; it may raise to stop (nothing is
        committed then).
        """
        if isinstance(prefix, str) and prefix:
            _refuse_atelier_data(prefix, self.storage.root)
        writer = self.writer(dataset_id)
        source = _PrefixSource(self.storage, prefix, storage_options)
        names = source.list()
        if len(names) > max_files:
            raise InvalidDatasetInputError(f"{prefix!r} holds {len(names)} files, over the limit of {max_files}",
                                           "prefix")
        by_stem = {_stem(n): n for n in names if n.lower().endswith(".txt")}
        images = [n for n in names if not n.lower().endswith(".txt")]
        used = set()

        def read(name: str) -> tuple[str, bytes | None, str]:
            return name, *source.read_with_caption(name, by_stem, self.max_image_bytes)

        # in chunks: reads overlap (S3 latency) while memory and the wait on a cancel stay bounded
        with ThreadPoolExecutor(max_workers=8) as pool:
            for start in range(0, len(images), _PREFIX_CHUNK):
                chunk = list(pool.map(read, images[start:start + _PREFIX_CHUNK]))
                items = []
                for name, data, caption in chunk:
                    used.add(_stem(name))
                    if data is None:
                        writer.reject(name, caption)  # caption holds the reason here
                    else:
                        items.append(ImageItem(filename=name, data=data, caption=caption, tags=list(tags or []),
                                               source=source.url_of(name), license=license))
                writer.add_many(items)
                for done in range(start + 1, start + len(chunk) + 1):
                    if progress is not None:
                        progress(done, len(images))
        for stem in by_stem.keys() - used:
            writer.reject(by_stem[stem], "caption file has no image of the same name")
        return writer.commit()

    def add_from_urls(self, dataset_id: str, urls: list[str], config: Any = None, *,
                      captions: Mapping[str, str] | None = None, tags: list[str] | None = None,
                      license: str | None = None,
                      progress: Callable[[int, int], None] | None = None,
                      poll: Callable[[], None] | None = None) -> AddResult:
        """Fetch ``urls`` (see :mod:`storage.url_import`) and add the images as one version.
        Refused and failed URLs are reported in ``rejected`` with the reason.

        ``progress(done, total)`` runs as each URL finishes and ``poll()`` every quarter second
        while fetches run; either may raise to stop (a cancel): running fetches are stopped
        mid-read and nothing is committed.
        """
        config = DatasetImportConfig.model_validate(config or {})
        # a fetched image over the store's limit is refused from its header, before it is stored
        config = config.model_copy(update={"max_pixels": min(config.max_pixels, self.max_pixels)})
        writer = self.writer(dataset_id)
        captions = dict(captions or {})
        done = 0

        def on_result(index: int, result) -> None:
            nonlocal done
            url = urls[index]
            if result.ok:
                writer.add(ImageItem(filename=url, data=result.data, caption=captions.get(url, ""),
                                     tags=list(tags or []), source=url, license=license))
            else:
                writer.reject(url, f"{result.status}: {result.reason}")
            done += 1
            if progress is not None:
                progress(done, len(urls))

        fetch_urls(list(urls), config, on_result, poll)
        return writer.commit()

    def add_from_url_items(self, dataset_id: str, items: list[UrlItem], config: Any = None, *,
                           progress: Callable[[int, int], None] | None = None,
                           poll: Callable[[], None] | None = None) -> AddResult:
        """Like :meth:`add_from_urls`, with each image's name, caption, tags, source, licence and
        attribution given (collected images); rejections and duplicates are named by ``filename``."""
        config = DatasetImportConfig.model_validate(config or {})
        config = config.model_copy(update={"max_pixels": min(config.max_pixels, self.max_pixels)})
        writer = self.writer(dataset_id)
        done = 0

        def on_result(index: int, result) -> None:
            nonlocal done
            item = items[index]
            if result.ok:
                writer.add(ImageItem(filename=item.filename, data=result.data, caption=item.caption,
                                     tags=list(item.tags), source=item.source, license=item.license,
                                     attribution=item.attribution))
            else:
                writer.reject(item.filename, f"{result.status}: {result.reason}")
            done += 1
            if progress is not None:
                progress(done, len(items))

        fetch_urls([item.url for item in items], config, on_result, poll)
        return writer.commit()

    # -- curation ---------------------------------------------------------------------------

    def edit(self, dataset_id: str, version: int, *, remove: Iterable[str] = (),
             captions: Mapping[str, str] | None = None, tags: Mapping[str, list[str]] | None = None) -> EditResult:
        """A new version: ``version``'s rows less ``remove``, with ``captions``/``tags`` replaced;
        images are named by sha256. ``version`` must be the latest (DatasetConflictError, also when
        another writer claims the next version first); earlier versions and files stay as they are."""
        remove, captions, tags = set(remove), dict(captions or {}), dict(tags or {})
        latest, base = self._latest(dataset_id)
        if version != latest:
            raise DatasetConflictError(f"version {version} is not the latest ({latest}); edit the latest version",
                                       "version")
        if not (remove or captions or tags):
            raise InvalidDatasetInputError("the edit changes nothing: give remove, captions or tags", "remove")
        shas = set(base.column("sha256").to_pylist())
        for what, names in (("remove", remove), ("captions", captions), ("tags", tags)):
            unknown = sorted(set(names) - shas)
            if unknown:
                raise InvalidDatasetInputError(f"{what}: version {version} has no image {unknown[0]!r}", what)
        for sha, caption in captions.items():
            if not isinstance(caption, str) or len(caption) > MAX_CAPTION_LENGTH:
                raise InvalidDatasetInputError(f"captions.{sha}: a caption is text of at most {MAX_CAPTION_LENGTH} "
                                               "characters", f"captions.{sha}")
        for sha, values in tags.items():
            if (not isinstance(values, list) or len(values) > MAX_TAGS
                    or any(not isinstance(t, str) or not t or len(t) > MAX_TAG_LENGTH for t in values)):
                raise InvalidDatasetInputError(f"tags.{sha}: at most {MAX_TAGS} non-empty strings of at most "
                                               f"{MAX_TAG_LENGTH} characters", f"tags.{sha}")
        rows, changed_captions, changed_tags = [], 0, 0
        for row in base.to_pylist():
            sha = row["sha256"]
            if sha in remove:
                continue
            if sha in captions and captions[sha] != row["caption"]:
                row["caption"], changed_captions = captions[sha], changed_captions + 1
            if sha in tags and list(tags[sha]) != list(row["tags"] or []):
                row["tags"], changed_tags = list(tags[sha]), changed_tags + 1
            rows.append(row)
        table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
        summary = {"dataset_id": dataset_id, "version": version + 1, "added": 0, "removed": len(remove),
                   "edited": changed_captions + changed_tags, "base_version": version,
                   "total_bytes": sum(table.column("size_bytes").to_pylist()), "created_at": time.time()}
        table = table.replace_schema_metadata({_META_KEY: json.dumps(summary).encode()})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        if not self.storage.put_if_absent(self.manifest_key(dataset_id, version + 1), buffer.getvalue(),
                                          "application/vnd.apache.parquet"):
            raise DatasetConflictError(f"version {version} is no longer the latest: another change was made "
                                       "meanwhile; reload and edit again", "version")
        return EditResult(dataset_id=dataset_id, version=version + 1, base_version=version, images=table.num_rows,
                          removed=len(remove), captions_changed=changed_captions, tags_changed=changed_tags)

    # -- captions made by the language model -------------------------------------------------

    def caption_checkpoint(self, dataset_id: str, fingerprint: str) -> "CaptionCheckpoint":
        """Where a captioning job keeps the captions it has made before it commits them."""
        self._read_info(dataset_id)
        return CaptionCheckpoint(self.storage, dataset_id, fingerprint)

    def commit_captions(self, dataset_id: str, base_version: int, captions: Mapping[str, str],
                        base_captions: Mapping[str, str]) -> CaptionCommit:
        """A new version: the newest manifest with ``captions`` (image sha256 -> caption) written in.

        The captions were made on ``base_version``, and a newer version may exist by now (an import,
        an edit). A caption lands on its image in the newest version only if the caption there is
        still ``base_captions[sha]`` (what the captioner saw): a caption someone changed meanwhile
        is kept, and an image removed meanwhile stays removed; both are reported in ``conflicts``.
        The version is claimed as every add claims one (``put_if_absent``), rebuilt on the newest
        version when another writer claimed it first. When no caption changes, no version is written.
        """
        for sha, caption in captions.items():
            if not isinstance(caption, str) or len(caption) > MAX_CAPTION_LENGTH:
                raise InvalidDatasetInputError(f"captions.{sha}: a caption is text of at most {MAX_CAPTION_LENGTH} "
                                               "characters", f"captions.{sha}")
        self._read_info(dataset_id)
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            latest, base = self._latest(dataset_id)
            rows, changed, conflicts, present = [], 0, [], set()
            for row in base.to_pylist():
                sha = row["sha256"]
                present.add(sha)
                if sha in captions:
                    if (row["caption"] or "") != (base_captions.get(sha) or ""):
                        conflicts.append(sha)
                    elif row["caption"] != captions[sha]:
                        row["caption"], changed = captions[sha], changed + 1
                rows.append(row)
            conflicts += sorted(set(captions) - present)
            if not changed:
                return CaptionCommit(dataset_id=dataset_id, version=latest, base_version=base_version,
                                     images=base.num_rows, captioned=0, conflicts=conflicts)
            version = latest + 1
            table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
            summary = {"dataset_id": dataset_id, "version": version, "added": 0, "captioned": changed,
                       "base_version": base_version, "total_bytes": sum(table.column("size_bytes").to_pylist()),
                       "created_at": time.time()}
            table = table.replace_schema_metadata({_META_KEY: json.dumps(summary).encode()})
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="zstd")
            if self.storage.put_if_absent(self.manifest_key(dataset_id, version), buffer.getvalue(),
                                          "application/vnd.apache.parquet"):
                if not self.storage.exists(self._info_key(dataset_id)):  # deleted meanwhile: leave nothing
                    self.storage.delete_prefix(dataset_prefix(dataset_id))
                    raise DatasetNotFoundError(f"dataset {dataset_id!r} was deleted while it was being captioned",
                                               "dataset_id")
                return CaptionCommit(dataset_id=dataset_id, version=version, base_version=base_version,
                                     images=table.num_rows, captioned=changed, conflicts=conflicts)
            time.sleep(0.005 * (_attempt % 10))  # another writer claimed it: rebuild on the newest
        raise DatasetBusyError(f"could not claim a new version of {dataset_id!r} after "
                               f"{MAX_CLAIM_ATTEMPTS} attempts; retry", "dataset_id")

    def add_outputs(self, dataset_id: str, keys: Iterable[str], captions: Mapping[str, str] | None = None, *,
                    tags: list[str] | None = None, license: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> AddResult:
        """Add generated images by storage key (under ``outputs/``); captions by key."""
        writer = self.writer(dataset_id)
        keys = list(keys)
        captions = dict(captions or {})
        for done, key in enumerate(keys, 1):
            try:
                validate_key(key)
                if not key.startswith(OUTPUTS_PREFIX):
                    raise InvalidKeyError(f"key {key!r} is not under {OUTPUTS_PREFIX}")
                data = self.storage.get_bytes(key)
            except (InvalidKeyError, ObjectNotFoundError) as exc:
                writer.reject(str(key), str(exc))
            else:
                writer.add(ImageItem(filename=key, data=data, caption=captions.get(key, ""), tags=list(tags or []),
                                     source=key, license=license))
            if progress is not None:
                progress(done, len(keys))
        return writer.commit()

    def add_job_outputs(self, dataset_id: str, job_ids: Iterable[str], *, tags: list[str] | None = None,
                        license: str | None = None, progress: Callable[[int, int], None] | None = None) -> AddResult:
        """Add the image outputs of finished jobs, captioned with the job's prompt."""
        jobs = JobStore(self.storage)
        keys, captions, missing = [], {}, []
        for job_id in job_ids:
            try:
                record = jobs.get(job_id)
            except JobNotFoundError:
                missing.append(Rejection(filename=str(job_id), reason="no such job"))
                continue
            prompt = (record.result or {}).get("prompt") or (record.request.get("sdxl") or {}).get("prompt") or ""
            images = [o.key for o in record.outputs if o.content_type.startswith("image/")]
            if not images:
                missing.append(Rejection(filename=job_id, reason=f"job has no image outputs (status {record.status})"))
            keys += images
            captions.update({k: prompt for k in images})
        result = self.add_outputs(dataset_id, keys, captions, tags=tags, license=license, progress=progress)
        result.rejected = missing + result.rejected
        return result

    def sample_keys(self, dataset_id: str, n: int = 4, version: int | None = None) -> list[str]:
        """The thumbnail keys of the first ``n`` images of a version."""
        return self.thumbnail_keys(dataset_id, self.manifest(dataset_id, version).slice(0, n).to_pylist())

    def thumbnail_keys(self, dataset_id: str, rows: list[dict]) -> list[str]:
        """For manifest rows, the key of each image's JPEG thumbnail (at most THUMBNAIL_PX on its
        longer side), made and stored beside the images on first use; an image that small already
        is its own thumbnail. Like the images, thumbnails are shared by all versions and go with
        the dataset."""
        def one(row: dict) -> str:
            if max(row["width"] or 0, row["height"] or 0) <= THUMBNAIL_PX:
                return row["key"]
            key = self.thumbnail_key(dataset_id, row["sha256"])
            if not self.storage.exists(key):
                with self.storage.open(row["key"]) as f, Image.open(f) as image:
                    image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))  # JPEGs decode at a reduced scale
                    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
                    out = io.BytesIO()
                    image.convert("RGB").save(out, "JPEG", quality=85)
                self.storage.put_bytes(key, out.getvalue(), content_type="image/jpeg")
            return key

        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(one, rows))


class DatasetWriter:
    """Collects images for one new version: ``add``/``add_many`` (thread-safe), then ``commit`` once.

    Image files are written as they arrive, so an import never holds every image in memory.
    """

    def __init__(self, store: DatasetStore, info: DatasetInfo):
        self.store = store
        self.info = info
        self.base_version, self.base = store._latest(info.id)
        self._base_shas = frozenset(self.base.column("sha256").to_pylist())
        self._staged: set[str] = set()
        self.rows: list[dict] = []
        self.duplicates: list[str] = []
        self.rejected: list[Rejection] = []
        self._lock = threading.Lock()

    def reject(self, filename: str, reason: str) -> None:
        with self._lock:
            self.rejected.append(Rejection(filename=filename, reason=reason))

    def add(self, item: ImageItem) -> str:
        """Check, store and stage one image: returns ``"added"``, ``"duplicate"`` or ``"rejected"``."""
        return self._record(*self._prepare(item))

    def add_many(self, items: Iterable[ImageItem], threads: int = 8) -> None:
        """``add`` each item; checks and writes overlap on threads (fsync and S3 latency), while
        rows keep the input order and the first of two identical images wins."""
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for outcome in pool.map(self._prepare, items):
                self._record(*outcome)

    def _prepare(self, item: ImageItem) -> tuple[str, str, Any]:
        """``(name, outcome, detail)``; writes the file of an image not already in the base version."""
        name = item.filename[:MAX_FILENAME_LENGTH] if isinstance(item.filename, str) else repr(item.filename)
        problem = _item_problem(item, self.store.max_image_bytes)
        if problem is None:
            try:
                ext, width, height = inspect_image(bytes(item.data), self.store.max_pixels)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            return name, "rejected", problem
        data = bytes(item.data)
        sha = hashlib.sha256(data).hexdigest()
        if sha in self._base_shas:
            return name, "duplicate", None
        key = DatasetStore.image_key(self.info.id, sha, ext)
        self.store.storage.put_bytes(key, data, content_type=_CONTENT_TYPES[ext])  # same bytes, same key: idempotent
        return name, "added", {"key": key, "width": width, "height": height, "caption": item.caption,
                               "tags": list(item.tags), "source": item.source,
                               "license": item.license or self.info.license, "sha256": sha,
                               "filename": name, "size_bytes": len(data),
                               "attribution": json.dumps(item.attribution) if item.attribution else None}

    def _record(self, name: str, outcome: str, detail: Any) -> str:
        with self._lock:
            if outcome == "added" and detail["sha256"] in self._staged:
                outcome = "duplicate"
            if outcome == "rejected":
                self.rejected.append(Rejection(filename=name, reason=detail))
            elif outcome == "duplicate":
                self.duplicates.append(name)
            else:
                self._staged.add(detail["sha256"])
                self.rows.append(detail)
        return outcome

    def commit(self) -> AddResult:
        """Claim the next version with the previous rows plus the new ones; retried on a race."""
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            base_shas = set(self.base.column("sha256").to_pylist())
            new_rows = [r for r in self.rows if r["sha256"] not in base_shas]
            # rows a concurrent add committed first are duplicates now
            duplicates = self.duplicates + [r["filename"] for r in self.rows if r["sha256"] in base_shas]
            if not new_rows:
                return self._result(self.base_version, 0, self.base.num_rows, duplicates)
            version = self.base_version + 1
            table = pa.concat_tables([self.base, pa.Table.from_pylist(new_rows, schema=MANIFEST_SCHEMA)])
            summary = {"dataset_id": self.info.id, "version": version, "added": len(new_rows),
                       "total_bytes": sum(table.column("size_bytes").to_pylist()),
                       "created_at": time.time()}
            table = table.replace_schema_metadata({_META_KEY: json.dumps(summary).encode()})
            buffer = io.BytesIO()
            pq.write_table(table, buffer, compression="zstd")
            if self.store.storage.put_if_absent(DatasetStore.manifest_key(self.info.id, version),
                              buffer.getvalue(), "application/vnd.apache.parquet"):
                self._check_not_deleted()
                return self._result(version, len(new_rows), table.num_rows, duplicates)
            # another add claimed this version: rebase on the newest and try the next number
            self.store._read_info(self.info.id)  # raises if the dataset was deleted meanwhile
            self.base_version, self.base = self.store._latest(self.info.id)
            time.sleep(0.005 * (_attempt % 10))
        raise DatasetBusyError(f"could not claim a new version of {self.info.id!r} after "
                               f"{MAX_CLAIM_ATTEMPTS} attempts; retry", "dataset_id")

    def _check_not_deleted(self) -> None:
        """A dataset deleted while this add ran (its info goes first): what the add wrote under it
        (images, the manifest) goes too, and the add fails, so nothing is left behind unlisted."""
        if self.store.storage.exists(DatasetStore._info_key(self.info.id)):
            return
        self.store.storage.delete_prefix(dataset_prefix(self.info.id))
        raise DatasetNotFoundError(f"dataset {self.info.id!r} was deleted while images were being added; "
                                   "nothing was kept", "dataset_id")

    def _result(self, version: int, added: int, images: int, duplicates: list[str]) -> AddResult:
        return AddResult(dataset_id=self.info.id, version=version, added=added, images=images,
                         duplicates=duplicates, rejected=self.rejected)


class CaptionCheckpoint:
    """Captions a captioning job has made but not committed, so that a re-run after a cancel or a
    failure asks the model only about the rest.

    One JSON object ({sha256: caption}) per batch under ``datasets/<id>/_captions/<fingerprint>/``;
    the fingerprint names the model and the caption settings, so a run with other settings starts
    afresh. It is no version: readers of the dataset never see it. The job clears it once its
    version is committed; deleting the dataset deletes it.
    """

    def __init__(self, storage: Storage, dataset_id: str, fingerprint: str):
        validate_id(fingerprint, "caption fingerprint")
        self.storage = storage
        self.prefix = f"{dataset_prefix(dataset_id)}_captions/{fingerprint}/"

    def load(self) -> dict[str, str]:
        captions: dict[str, str] = {}
        for key in self.storage.list(self.prefix):
            try:
                part = self.storage.get_json(key)
            except (ObjectNotFoundError, ValueError):
                continue  # cleared meanwhile, or a part cut short: those images are asked again
            if isinstance(part, dict):
                captions.update({k: v for k, v in part.items() if isinstance(k, str) and isinstance(v, str)})
        return captions

    def save(self, captions: Mapping[str, str]) -> None:
        if captions:
            self.storage.put_json(f"{self.prefix}{new_id('part')}.json", dict(captions))

    def clear(self) -> None:
        self.storage.delete_prefix(self.prefix)


class _PrefixSource:
    """Files under a key prefix of the store's root, or under an fsspec URL / absolute path.

    Local files (a local path, or a key prefix of a local root) are read through their real
    path, and only if it is inside the real folder they were listed from (``confine``): a
    symlinked file that points out of it is an error naming the file. Local folders are walked
    without following linked folders.
    """

    def __init__(self, storage: Storage, prefix: str, storage_options: dict | None):
        if not isinstance(prefix, str) or not prefix:
            raise InvalidDatasetInputError("prefix must be a non-empty string", "prefix")
        self.storage = storage
        self.inside = _is_relative(prefix)
        self.confine: str | None = None  # the real folder local files must stay in
        if self.inside:
            try:
                self.prefix = validate_prefix(prefix)
            except InvalidKeyError as exc:
                raise InvalidDatasetInputError(str(exc), "prefix") from None
            if storage.protocol == "file":
                self.confine = os.path.realpath(storage.full_path(IMPORTS_PREFIX.rstrip("/")))
            return
        if any(seg == ".." for seg in prefix.split("://", 1)[-1].split("/")):
            raise InvalidDatasetInputError(f"prefix {prefix!r} has '..' segments", "prefix")
        self.fs, self.root = fsspec.core.url_to_fs(prefix, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.protocol = prefix.split("://", 1)[0] if "://" in prefix else "file"
        self.remote = self.protocol not in ("file", "local")
        if not self.remote:
            self.root = os.path.realpath(self.root)
            self.confine = self.root

    def list(self) -> list[str]:
        """Names relative to the prefix (inside: storage keys), sorted, dot files skipped."""
        if self.inside:
            return [k for k in self.storage.list(self.prefix) if not _hidden(k)]
        if not self.remote:
            return sorted(r for r in _walk_local(self.root) if not _hidden(r))
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return []
        rel = [p[len(self.root) + 1:] for p in found if p.startswith(self.root + "/")]
        return sorted(r for r in rel if r and not _hidden(r))

    def url_of(self, name: str) -> str:
        if self.inside:
            return name
        return f"{self.protocol}://{self.root}/{name}" if self.remote else f"{self.root}/{name}"

    def _read(self, name: str, limit: int) -> bytes:
        if self.inside and self.confine is None:  # S3: no links
            if self.storage.size(name) > limit:
                raise ValueError(f"file is over the limit of {limit} bytes")
            return self.storage.get_bytes(name)
        if self.confine is not None:
            path = self.storage.full_path(name) if self.inside else f"{self.root}/{name}"
            data = _read_confined(path, self.confine, limit + 1)
        else:
            with self.fs.open(f"{self.root}/{name}", "rb") as f:
                data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"file is over the limit of {limit} bytes")
        return data

    def read_with_caption(self, name: str, captions: dict[str, str], limit: int) -> tuple[bytes | None, str]:
        """``(image bytes, caption)``, or ``(None, reason)`` if it cannot be read."""
        try:
            data = self._read(name, limit)
            caption_name = captions.get(_stem(name))
            caption = self._read(caption_name, 1024 * 1024).decode("utf-8-sig").strip() if caption_name else ""
        except (OSError, ValueError, ObjectNotFoundError) as exc:
            return None, f"cannot read: {exc}"
        return data, caption


def _walk_local(root: str) -> list[str]:
    """Files under the local folder ``root``, relative to it; linked folders are not entered."""
    out = []
    for dirpath, _dirs, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        out += [rel_dir + name for name in filenames]
    return out


def _read_confined(path: str, confine: str, size: int) -> bytes:
    """Up to ``size`` bytes of the local file ``path``, whose real path must be inside ``confine``."""
    real = os.path.realpath(path)
    if not _under(real, confine):
        raise ValueError("the file is a link to outside the import folder")
    # no link swapped in since; a FIFO must not block the open
    fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        return f.read(size)


CREDIT_COLUMNS = ("image_id", "filename", "source", "title", "photographer", "photographer_url", "page_url",
                  "license", "license_url", "key")


def credits_csv(table: pa.Table) -> str:
    """A CSV of credits, one row per image of a manifest: who made it, where it came from and its
    licence (attribution fields are empty for images that have none)."""
    import csv

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CREDIT_COLUMNS)
    for row in table.to_pylist():
        try:
            credit = json.loads(row.get("attribution") or "{}")
        except ValueError:
            credit = {}
        values = [row["sha256"], row["filename"], credit.get("source") or row["source"], credit.get("title", ""),
                  credit.get("photographer", ""), credit.get("photographer_url", ""), credit.get("page_url", ""),
                  row["license"], credit.get("license_url", ""), row["key"]]
        # a cell a spreadsheet would run as a formula is quoted as text
        writer.writerow(["'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@") else v for v in values])
    return out.getvalue()
