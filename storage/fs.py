"""Artifact storage under one root: a local folder or ``s3://bucket/prefix`` (through fsspec).

Keys are ``/``-separated paths relative to the root (``outputs/2026/11/21/job_x/0.png``).
Every key is validated before use (:func:`validate_key`), which blocks path traversal: no
empty key, no leading ``/``, no empty, ``.`` or ``..`` segments, no backslash, NUL or other
control characters, no glob characters (``* ? [ ]``), at most 1024 characters, and no segment
starting with ``.tmp-`` (reserved for temp files).

Guarantees
----------
* **Atomic writes.** A reader sees either the previous object or the complete new one, never a
  partial one.
  - Local: data goes to a temp file ``.tmp-*`` in the destination directory, is flushed and
    ``fsync``-ed, then moved over the destination with ``os.replace`` (atomic on POSIX; the
    directory is fsync-ed afterwards for durability). A failed write leaves the old object
    intact and removes the temp file. ``list()`` never returns temp files.
  - S3: ``put_bytes`` is one ``PutObject`` (objects over 100 MiB go multipart; S3 only
    exposes a multipart object once ``CompleteMultipartUpload`` succeeds); ``put_file`` uses
    s3fs ``put_file`` (single PUT or multipart, same guarantee; a failed upload is aborted).
    ``get_bytes`` reads with a single ``GetObject``; ``open()`` pins the object's ETag, so a
    stream that outlives an overwrite fails instead of mixing versions.
* **No stale reads from caches.** s3fs's listings cache is disabled (``use_listings_cache=
  False``), so listings and ``exists`` always ask S3. The s3fs instance is re-created in a
  forked child.
* **Content types** are stored on S3 objects (given, or guessed from the key's extension).
  Local files carry none.
* **Pickling.** A ``Storage`` pickles as ``(root, storage_options)`` and rebuilds its
  filesystem lazily in the receiving process (e.g. a Ray actor).

Concurrency: writes to one key are last-writer-wins; there is no compare-and-swap.
The methods are blocking; from async code call them through a thread pool.
"""

from __future__ import annotations

import errno
import json
import mimetypes
import os
import re
import shutil
import tempfile
import threading
from typing import IO, Any

import fsspec

__all__ = [
    "Storage",
    "StorageError",
    "InvalidKeyError",
    "ObjectNotFoundError",
    "validate_key",
    "validate_prefix",
    "TEMP_PREFIX",
    "MAX_KEY_LENGTH",
]

TEMP_PREFIX = ".tmp-"
MAX_KEY_LENGTH = 1024
ENDPOINT_ENV = "ATELIER_S3_ENDPOINT_URL"
_COPY_BUFSIZE = 1024 * 1024
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\*?\[\]]")


class StorageError(Exception):
    """Base class for storage errors."""


class InvalidKeyError(StorageError, ValueError):
    """The key is not a safe relative key (traversal, bad characters, too long...)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object at this key."""


def _check_path(value: object, what: str, allow_trailing_slash: bool) -> str:
    if not isinstance(value, str):
        raise InvalidKeyError(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"{what} must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidKeyError(f"{what} is longer than {MAX_KEY_LENGTH} characters")
    m = _BAD_CHARS.search(value)
    if m:
        raise InvalidKeyError(f"{what} {value!r} contains a forbidden character {m.group()!r}")
    if value.startswith("/"):
        raise InvalidKeyError(f"{what} {value!r} must be relative (no leading '/')")
    body = value[:-1] if allow_trailing_slash and value.endswith("/") else value
    for seg in body.split("/"):
        if seg == "":
            raise InvalidKeyError(f"{what} {value!r} has an empty path segment")
        if seg in (".", ".."):
            raise InvalidKeyError(f"{what} {value!r} has a '{seg}' path segment")
        if seg.startswith(TEMP_PREFIX):
            raise InvalidKeyError(f"{what} {value!r}: segments starting {TEMP_PREFIX!r} are reserved")
    return value


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`InvalidKeyError`."""
    return _check_path(key, "key", allow_trailing_slash=False)


def validate_prefix(prefix: object) -> str:
    """Like :func:`validate_key`, but ``""`` and a trailing ``/`` are allowed."""
    if prefix == "":
        return ""
    return _check_path(prefix, "prefix", allow_trailing_slash=True)


def _is_temp(rel: str) -> bool:
    return any(seg.startswith(TEMP_PREFIX) for seg in rel.split("/"))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Storage:
    """Key/value object storage rooted at a local folder or an ``s3://`` prefix.

    ``root``: ``"var/storage"``, ``"/abs/dir"``, ``"file:///abs/dir"`` or
    ``"s3://bucket/prefix"``. Local roots are made absolute and created.
    ``storage_options`` go to ``s3fs.S3FileSystem`` (``key``, ``secret``, ``endpoint_url`` or
    ``client_kwargs={"endpoint_url": ...}``, ...). Without an endpoint in them, the env var
    ``ATELIER_S3_ENDPOINT_URL`` sets one; credentials otherwise follow boto's usual chain.
    """

    def __init__(self, root: str, storage_options: dict | None = None):
        if not isinstance(root, str) or not root.strip():
            raise ValueError("storage root must be a non-empty string")
        options = dict(storage_options or {})
        root = root.strip()
        if "://" in root:
            protocol, _, rest = root.partition("://")
            protocol = protocol.lower()
        else:
            protocol, rest = "file", root
        if protocol in ("file", "local"):
            path = os.path.abspath(os.path.expanduser(rest))
            os.makedirs(path, exist_ok=True)
            self.protocol = "file"
            self.root = path
            self._base = path  # filesystem path of the root
        elif protocol in ("s3", "s3a"):
            rest = rest.strip("/")
            bucket = rest.split("/", 1)[0]
            if not bucket:
                raise ValueError(f"S3 storage root {root!r} names no bucket")
            if "//" in rest or any(s in (".", "..") for s in rest.split("/")):
                raise ValueError(f"S3 storage root {root!r} is malformed")
            endpoint = os.environ.get(ENDPOINT_ENV)
            has_endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
                "endpoint_url"
            )
            if endpoint and not has_endpoint:
                options["endpoint_url"] = endpoint
            self.protocol = "s3"
            self.root = f"s3://{rest}"
            self._base = rest  # "bucket/prefix", as s3fs names paths
        else:
            raise ValueError(
                f"unsupported storage root {root!r}: use a local path, file:// or s3://"
            )
        self.storage_options = options
        self._fs: fsspec.AbstractFileSystem | None = None
        self._fs_pid: int | None = None
        self._fs_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    def __reduce__(self):
        return (type(self), (self.root, self.storage_options))

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Storage)
            and other.root == self.root
            and other.storage_options == self.storage_options
        )

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The fsspec filesystem (built lazily, once per process)."""
        pid = os.getpid()
        if self._fs is None or self._fs_pid != pid:
            with self._fs_lock:
                if self._fs is None or self._fs_pid != pid:
                    self._fs = self._make_fs()
                    self._fs_pid = pid
        return self._fs

    def _make_fs(self) -> fsspec.AbstractFileSystem:
        if self.protocol == "file":
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem()
        import s3fs

        opts = dict(self.storage_options)
        # a stale listing would break list()/exists(). It is part of fsspec's instance-cache
        # token, so Storages with equal options share one s3fs instance (and its botocore
        # session, slow to build) per process and thread, never one with a listings cache.
        opts["use_listings_cache"] = False
        return s3fs.S3FileSystem(**opts)

    def _path(self, key: str) -> str:
        """Backend path of a validated key (absolute local path, or ``bucket/prefix/key``)."""
        if self.protocol == "file":
            return os.path.join(self._base, *key.split("/"))
        return f"{self._base}/{key}"

    def full_path(self, key: str) -> str:
        """Absolute path (local) or ``s3://bucket/prefix/key`` URL of ``key``."""
        validate_key(key)
        if self.protocol == "file":
            return self._path(key)
        return f"{self.root}/{key}"

    def _content_type(self, key: str, content_type: str | None) -> str | None:
        if content_type:
            return content_type
        guessed, _ = mimetypes.guess_type(key.rsplit("/", 1)[-1])
        return guessed

    # -- writes ---------------------------------------------------------------------------

    def _local_atomic_write(self, key: str, write, exclusive: bool = False) -> None:
        """Write through a temp file, then publish it under its name: `os.replace`, or with
        `exclusive` a hard link, which fails with FileExistsError if the name exists."""
        path = self._path(key)
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, _FILE_MODE)
            if exclusive:
                os.link(tmp, path)
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(directory)

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        """Write ``data`` at ``key`` atomically; returns ``key``."""
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        if self.protocol == "file":
            self._local_atomic_write(key, lambda f: f.write(data))
        else:
            kwargs = {}
            ct = self._content_type(key, content_type)
            if ct:
                kwargs["ContentType"] = ct
            # one PutObject up to 100 MiB (s3fs goes multipart above that)
            self.fs.pipe_file(self._path(key), bytes(data), **kwargs)
        return key

    def put_if_absent(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Create ``key`` only if nothing is there; True if this call created it.

        The one compare-and-set the stores build claims on (dataset versions and names, LoRA
        versions, run names, saved workflows). Local: a temp file hard-linked to its name, since
        ``link(2)`` fails if the name exists and a reader never sees a partial file. S3: one
        PutObject with ``If-None-Match: *`` (s3fs ``mode="create"``), which S3 answers 412 if the
        key exists.
        """
        validate_key(key)
        if self.protocol != "file":
            ct = self._content_type(key, content_type)
            try:
                self.fs.pipe_file(self._path(key), bytes(data), mode="create", **({"ContentType": ct} if ct else {}))
            except FileExistsError:  # s3fs maps 412 Precondition Failed to this
                return False
            return True
        try:
            self._local_atomic_write(key, lambda f: f.write(data), exclusive=True)
        except FileExistsError:
            return False
        return True

    def put_file(
        self, key: str, local_path: str | os.PathLike, content_type: str | None = None
    ) -> str:
        """Copy the local file ``local_path`` to ``key`` atomically, streaming; returns ``key``."""
        validate_key(key)
        local_path = os.fspath(local_path)
        if not os.path.isfile(local_path):
            raise FileNotFoundError(errno.ENOENT, "no such local file", local_path)
        if self.protocol == "file":

            def copy(dst: IO[bytes]) -> None:
                with open(local_path, "rb") as src:
                    shutil.copyfileobj(src, dst, _COPY_BUFSIZE)

            self._local_atomic_write(key, copy)
        else:
            kwargs = {}
            ct = self._content_type(key, content_type)
            if ct:
                kwargs["ContentType"] = ct
            self.fs.put_file(local_path, self._path(key), **kwargs)
        return key

    def put_json(self, key: str, obj: Any) -> str:
        """Write ``obj`` as UTF-8 JSON (``application/json``); returns ``key``."""
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self.put_bytes(key, data, content_type="application/json")

    # -- reads ----------------------------------------------------------------------------

    def get_bytes(self, key: str) -> bytes:
        validate_key(key)
        path = self._path(key)
        try:
            if self.protocol == "file":
                with open(path, "rb") as f:
                    return f.read()
            # one GetObject: s3fs's concurrent ranged reads could straddle an overwrite
            return self.fs.cat_file(path, max_concurrency=1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFoundError(f"no object at key {key!r}") from e

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def open(self, key: str, mode: str = "rb"):
        """A read handle for streaming (``"rb"`` or ``"r"``)."""
        if mode not in ("rb", "r", "rt"):
            raise ValueError(f"Storage.open supports read modes only ('rb', 'r'), got {mode!r}")
        validate_key(key)
        path = self._path(key)
        try:
            if self.protocol == "file":
                if mode == "rb":
                    return open(path, "rb")
                return open(path, "r", encoding="utf-8")
            if not self._is_file(path):
                raise FileNotFoundError(path)
            if mode == "rb":
                return self.fs.open(path, "rb")
            return self.fs.open(path, "rt", encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise ObjectNotFoundError(f"no object at key {key!r}") from e

    def _is_file(self, path: str) -> bool:
        if self.protocol == "file":
            return os.path.isfile(path)
        try:
            return self.fs.info(path).get("type") == "file"
        except FileNotFoundError:
            return False

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._is_file(self._path(key))

    def size(self, key: str) -> int:
        validate_key(key)
        path = self._path(key)
        try:
            if self.protocol == "file":
                if not os.path.isfile(path):
                    raise FileNotFoundError(path)
                return os.path.getsize(path)
            info = self.fs.info(path)
            if info.get("type") != "file":
                raise FileNotFoundError(path)
            return int(info["size"])
        except (FileNotFoundError, NotADirectoryError) as e:
            raise ObjectNotFoundError(f"no object at key {key!r}") from e

    # -- deletes --------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
        validate_key(key)
        path = self._path(key)
        if self.protocol == "file":
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except IsADirectoryError:
                pass  # a "folder", not an object
            return
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under the folder ``prefix``; returns how many were deleted.

        ``prefix`` is treated as a folder: ``"datasets/d1"`` deletes ``datasets/d1/...`` but
        not ``datasets/d10/...``. The empty prefix (everything) is refused.
        """
        validate_prefix(prefix)
        if not prefix:
            raise InvalidKeyError("refusing to delete_prefix('') (the whole root)")
        folder = prefix if prefix.endswith("/") else prefix + "/"
        keys = self.list(folder, recursive=True)
        if not keys:
            return 0
        if self.protocol == "file":
            n = 0
            for key in keys:
                try:
                    os.unlink(self._path(key))
                    n += 1
                except FileNotFoundError:
                    pass
            # prune now-empty directories (best effort; concurrent writers may refill them)
            top = self._path(folder.rstrip("/"))
            for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
            return n
        paths = [self._path(k) for k in keys]
        for i in range(0, len(paths), 1000):
            self.fs.rm(paths[i : i + 1000])  # DeleteObjects, 1000 keys a call
        return len(keys)

    # -- listing --------------------------------------------------------------------------

    def list(self, prefix: str = "", recursive: bool = True) -> list[str]:
        """Keys under the root that start with ``prefix``, relative to the root, sorted.

        ``prefix`` is a plain string prefix, as in S3 (``"jobs/job_01"`` matches
        ``jobs/job_01abc.json``); end it with ``/`` to mean a folder. With
        ``recursive=False`` only the entries directly in the prefix's folder are returned:
        objects, and sub-folders as ``"folder/"`` (with a trailing slash).
        Temp files of in-flight local writes are never listed.
        """
        validate_prefix(prefix)
        folder, _, base = prefix.rpartition("/")  # folder part and name-prefix part
        if self.protocol == "file":
            out = self._list_local(folder, base, recursive)
        else:
            out = self._list_s3(folder, base, recursive)
        return sorted(k for k in out if k.startswith(prefix) and not _is_temp(k))

    def _list_local(self, folder: str, base: str, recursive: bool) -> list[str]:
        top = self._path(folder) if folder else self._base
        out: list[str] = []
        prefix_rel = f"{folder}/" if folder else ""
        if not recursive:
            try:
                entries = list(os.scandir(top))
            except (FileNotFoundError, NotADirectoryError):
                return []
            for e in entries:
                if not e.name.startswith(base) or e.name.startswith(TEMP_PREFIX):
                    continue
                if e.is_dir(follow_symlinks=False):
                    out.append(f"{prefix_rel}{e.name}/")
                elif e.is_file():
                    out.append(prefix_rel + e.name)
            return out
        if not os.path.isdir(top):
            return []
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, top)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            if not rel_dir:
                dirnames[:] = [d for d in dirnames if d.startswith(base)]
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                out.append(prefix_rel + rel_dir + name)
        return out

    def _list_s3(self, folder: str, base: str, recursive: bool) -> list[str]:
        top = f"{self._base}/{folder}" if folder else self._base
        strip = len(self._base) + 1
        out: list[str] = []
        try:
            if recursive:
                names = self.fs.find(top, prefix=base)
                out = [n[strip:] for n in names if n.startswith(self._base + "/")]
                out = [k for k in out if not k.endswith("/")]
            else:
                entries = self.fs.find(top, prefix=base, maxdepth=1, withdirs=True, detail=True)
                for name, info in entries.items():
                    name = name.rstrip("/")
                    if not name.startswith(top + "/") or "/" in name[len(top) + 1 :]:
                        continue
                    rel = name[strip:]
                    out.append(rel + "/" if info.get("type") == "directory" else rel)
        except FileNotFoundError:
            return []
        # drop "folder marker" objects (keys ending in '/') some S3 tools create
        return [k for k in out if k and (not recursive or not k.endswith("/"))]

    # -- URLs -----------------------------------------------------------------------------

    def presign(self, key: str, expires: int = 3600) -> str | None:
        """A presigned GET URL (S3) valid for ``expires`` seconds; ``None`` for local roots.

        The URL is made without checking that the object exists (a GET would then be a 404).
        """
        validate_key(key)
        if self.protocol == "file":
            return None
        return self.fs.sign(self._path(key), expiration=int(expires))
