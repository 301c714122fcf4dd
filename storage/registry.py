"""LoRA model registry: named, versioned adapters in a :class:`Storage`.

Layout under the storage root (``lora_prefix`` in :mod:`storage.keys`)::

    models/loras/<name>/<version>/claim.json                        claims the version number
    models/loras/<name>/<version>/pytorch_lora_weights.safetensors  the adapter (diffusers format)
    models/loras/<name>/<version>/manifest.json                     the LoraRecord (and weights sha256); written last
    models/loras/<name>/<version>/deleted.json                      a deleted version (its number is not reused)

Versions are 1, 2, ... per name. Registering claims the next number by creating its
``claim.json`` only if nothing is there (the same create-if-absent as a dataset version claim in
:mod:`storage.datasets`: ``link(2)`` locally, ``If-None-Match: *`` on S3), writes the weights,
then the manifest. A version exists for readers once its manifest does, so a reader never sees
a version without its weights, and a register that fails (or a training run that fails before
registering) leaves nothing registered: its claim and weights are removed.

A name is taken once any version of it is registered; registering it again is refused with
:class:`LoraExistsError` unless ``new_version=True`` is asked for. Of two concurrent first
registrations of one name, the one that claimed the lower number wins and the other is refused.

References: ``"name"`` is the latest version, ``"name:3"`` (or ``"name:latest"``) a given one.
``:`` cannot appear in a name (:func:`storage.keys.validate_id`), so the form is unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from storage.fs import ObjectNotFoundError, Storage
from storage.keys import LORAS_PREFIX, lora_prefix, validate_id

__all__ = [
    "WEIGHTS_NAME",
    "MAX_NAME_LENGTH",
    "LoraRegistryError",
    "LoraNotFoundError",
    "LoraExistsError",
    "InvalidLoraError",
    "LoraManifest",
    "LoraRecord",
    "LoraRegistry",
    "parse_lora_ref",
    "check_safetensors",
]

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # the file name diffusers' loaders look for
MANIFEST_NAME = "manifest.json"
CLAIM_NAME = "claim.json"
DELETED_NAME = "deleted.json"
MAX_NAME_LENGTH = 100
MAX_CLAIM_ATTEMPTS = 100
STALE_CLAIM_S = 600.0  # a claim this old without a manifest was left by a crashed registration
MAX_WEIGHTS_BYTES = 4 * 1024**3


# --- errors ----------------------------------------------------------------------------------


class LoraRegistryError(Exception):
    """Base class; ``param`` names the offending argument (``name``, ``version``, ``lora``...)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class LoraNotFoundError(LoraRegistryError, LookupError):
    """No such LoRA, or no such version of it."""


class LoraExistsError(LoraRegistryError):
    """The name is registered already (and no new version was asked for)."""


class InvalidLoraError(LoraRegistryError, ValueError):
    """A bad name, reference, manifest or weights file."""


# --- models ----------------------------------------------------------------------------------


class LoraManifest(BaseModel):
    """What a training run says about the adapter it produced. Unknown fields are kept."""

    model_config = ConfigDict(extra="allow")

    base_model: str = Field(description="Path or hub id of the base pipeline it was trained on.")
    method: Literal["lora", "dreambooth"] = "lora"
    trigger_word: str | None = None
    rank: int = Field(gt=0)
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    train_text_encoder: bool = False
    dataset_id: str | None = None
    dataset_version: int | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="Final metrics (loss, steps, samples/s...).")
    validation_prompt: str | None = None
    validation_seeds: list[int] = Field(default_factory=list)
    validation_images: list[dict[str, Any]] = Field(
        default_factory=list, description="{step, seed, key} of images rendered with the adapter.")
    training_run: str | None = Field(None, description="The training run that produced it.")
    description: str = ""


class LoraRecord(BaseModel):
    """A registered version: what :meth:`LoraRegistry.get` returns (and ``manifest.json`` holds)."""

    name: str
    version: int
    created_at: float
    weights_key: str
    size_bytes: int
    sha256: str | None = Field(None, description="Hex sha256 of the weights file, for lineage; None on "
                                                 "versions registered before it was recorded.")
    manifest: LoraManifest
    owner: str | None = Field(None, description="The tenant whose training run registered it (None: open mode). "
                                                "Every version of a name has one owner.")
    public: bool = Field(False, description="Usable and listed for every key (read-only); otherwise only its "
                                            "owner's keys see it.")

    @property
    def id(self) -> str:
        """``name:version``, the reference that pins this version."""
        return f"{self.name}:{self.version}"

    @property
    def base_model(self) -> str:
        return self.manifest.base_model

    @property
    def trigger_word(self) -> str | None:
        return self.manifest.trigger_word


# --- helpers ---------------------------------------------------------------------------------


def _valid_name(name: object, param: str = "name") -> str:
    try:
        validate_id(name, "LoRA name")
    except ValueError as exc:
        raise InvalidLoraError(str(exc), param) from None
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidLoraError(f"LoRA name is longer than {MAX_NAME_LENGTH} characters", param)
    return name


def _valid_version(version: object, param: str = "version") -> int:
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidLoraError(f"LoRA version must be a positive integer, got {version!r}", param)
    return version


def parse_lora_ref(ref: object, param: str = "lora") -> tuple[str, int | None]:
    """``"name"`` → ``(name, None)`` (latest); ``"name:3"`` → ``(name, 3)``; ``"name:latest"`` → latest."""
    if not isinstance(ref, str) or not ref:
        raise InvalidLoraError("a LoRA reference must be a non-empty string 'name' or 'name:version'", param)
    name, sep, version = ref.partition(":")
    _valid_name(name, param)
    if not sep or version == "latest":
        return name, None
    return name, _valid_version(version, param)


def check_safetensors(data: bytes) -> list[str]:
    """The tensor names in a safetensors file; InvalidLoraError if it is not one, or holds no LoRA."""
    if len(data) < 8:
        raise InvalidLoraError("adapter is not a safetensors file (too short)", "weights")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100 * 1024 * 1024:
        raise InvalidLoraError("adapter is not a safetensors file (bad header length)", "weights")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InvalidLoraError("adapter is not a safetensors file (header is not JSON)", "weights") from None
    if not isinstance(header, dict):
        raise InvalidLoraError("adapter is not a safetensors file (header is not an object)", "weights")
    names = [k for k in header if k != "__metadata__"]
    if not any("lora" in k for k in names):
        raise InvalidLoraError("adapter holds no LoRA tensors", "weights")
    return names


def _read_adapter(adapter: bytes | str | os.PathLike) -> bytes:
    if isinstance(adapter, (bytes, bytearray, memoryview)):
        return bytes(adapter)
    path = os.fspath(adapter)
    if os.path.isdir(path):  # a folder written by save_lora_weights
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise InvalidLoraError(f"no adapter file at {path!r}", "weights")
    if os.path.getsize(path) > MAX_WEIGHTS_BYTES:
        raise InvalidLoraError(f"adapter is over {MAX_WEIGHTS_BYTES} bytes", "weights")
    with open(path, "rb") as f:
        return f.read()


# --- the registry ----------------------------------------------------------------------------


class LoraRegistry:
    """Register, look up and list LoRA adapters in a :class:`Storage`. Methods block."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def __reduce__(self):
        return (type(self), (self.storage,))

    # -- keys -------------------------------------------------------------------------------

    @staticmethod
    def weights_key(name: str, version: int) -> str:
        """Storage key of a version's ``pytorch_lora_weights.safetensors`` (existing or not)."""
        return f"{lora_prefix(_valid_name(name), _valid_version(version))}{WEIGHTS_NAME}"

    @staticmethod
    def manifest_key(name: str, version: int) -> str:
        return f"{lora_prefix(_valid_name(name), _valid_version(version))}{MANIFEST_NAME}"

    @staticmethod
    def _claim_key(name: str, version: int) -> str:
        return f"{lora_prefix(name, version)}{CLAIM_NAME}"

    # -- reads ------------------------------------------------------------------------------

    def _claimed_versions(self, name: str) -> list[int]:
        """Version folders of ``name``: registered, being registered, deleted, or left by a crash."""
        prefix = f"{LORAS_PREFIX}{name}/"
        out = []
        for entry in self.storage.list(prefix, recursive=False):
            part = entry[len(prefix):].rstrip("/")
            if entry.endswith("/") and part.isdigit() and int(part) > 0:
                out.append(int(part))
        return sorted(out)

    def _live_versions(self, name: str, excluding: int) -> list[int]:
        """Versions other than ``excluding`` that are registered or being registered (a claim
        younger than STALE_CLAIM_S without a manifest). Deleted versions and claims left by a
        crashed registration are not live."""
        live = []
        for v in self._claimed_versions(name):
            if v == excluding:
                continue
            if self.storage.exists(self.manifest_key(name, v)):
                live.append(v)
                continue
            try:
                claimed_at = float(self.storage.get_json(self._claim_key(name, v)).get("claimed_at", 0))
            except (ObjectNotFoundError, ValueError, AttributeError):
                continue
            deleted = self.storage.exists(f"{lora_prefix(name, v)}{DELETED_NAME}")
            if time.time() - claimed_at < STALE_CLAIM_S and not deleted:
                live.append(v)
        return live

    def versions(self, name: str) -> list[int]:
        """Registered versions of ``name``, ascending (``[]`` if none)."""
        _valid_name(name)
        return [v for v in self._claimed_versions(name) if self.storage.exists(self.manifest_key(name, v))]

    def exists(self, name: str) -> bool:
        """Whether any version of ``name`` is registered."""
        return bool(self.versions(name))

    def get(self, name: str, version: int | str | None = None) -> LoraRecord:
        """A registered version (default: the latest). LoraNotFoundError if there is none."""
        _valid_name(name)
        if version is None or version == "latest":
            versions = self.versions(name)
            if not versions:
                raise LoraNotFoundError(f"no LoRA named {name!r} is registered", "name")
            version = versions[-1]
        version = _valid_version(version)
        try:
            data = self.storage.get_json(self.manifest_key(name, version))
        except ObjectNotFoundError:
            if self.versions(name):
                raise LoraNotFoundError(f"LoRA {name!r} has no version {version}", "version") from None
            raise LoraNotFoundError(f"no LoRA named {name!r} is registered", "name") from None
        return LoraRecord.model_validate(data)

    def is_registered(self, name: str, version: int) -> bool:
        """Whether that version is registered now (False once it is deleted): one existence check."""
        return self.storage.exists(self.manifest_key(name, version))

    def resolve(self, ref: str, param: str = "lora") -> LoraRecord:
        """The record a ``name`` / ``name:version`` reference means; errors name ``param``."""
        name, version = parse_lora_ref(ref, param)
        try:
            return self.get(name, version)
        except LoraNotFoundError as exc:
            raise LoraNotFoundError(exc.message, param) from None

    def get_weights(self, name: str, version: int) -> bytes:
        """The safetensors bytes of a registered version."""
        return self.storage.get_bytes(self.weights_key(name, version))

    def names(self) -> list[str]:
        """Names with at least one registered version, sorted."""
        out = []
        for entry in self.storage.list(LORAS_PREFIX, recursive=False):
            name = entry[len(LORAS_PREFIX):].rstrip("/")
            if entry.endswith("/") and self.versions(name):
                out.append(name)
        return sorted(out)

    def list(self, name: str | None = None, latest_only: bool = False) -> list[LoraRecord]:
        """Registered versions (of one name, or all), sorted by name then version.

        ``latest_only`` gives one record per name (what a model listing shows by default)."""
        names = [_valid_name(name)] if name is not None else self.names()
        out = []
        for n in names:
            versions = self.versions(n)
            for v in versions[-1:] if latest_only else versions:
                try:
                    out.append(self.get(n, v))
                except LoraNotFoundError:
                    continue  # deleted meanwhile
        return out

    def find_by_run(self, name: str, training_run: str) -> LoraRecord | None:
        """The version of ``name`` a given training run registered, if any (retries are idempotent)."""
        for record in self.list(name):
            if record.manifest.training_run == training_run:
                return record
        return None

    # -- writes -----------------------------------------------------------------------------

    def name_owner(self, name: str) -> tuple[bool, str | None]:
        """(whether ``name`` has a version, the owner of its latest)."""
        versions = self.versions(name)
        if not versions:
            return False, None
        try:
            return True, self.get(name, versions[-1]).owner
        except LoraNotFoundError:
            return False, None

    def check_owner(self, name: str, owner: str | None) -> None:
        """LoraExistsError (param ``name``) if ``name`` is registered by another owner: a new version
        of someone else's name is refused, so nobody takes over a name others use."""
        taken, holder = self.name_owner(name)
        if taken and holder != owner:
            raise LoraExistsError(f"the LoRA name {name!r} belongs to another owner; choose another name", "name")

    def register(self, name: str, manifest: LoraManifest | dict, adapter: bytes | str | os.PathLike,
                 new_version: bool = False, owner: str | None = None, public: bool = False) -> LoraRecord:
        """Register an adapter as the next version of ``name`` and return its record.

        ``adapter``: the safetensors bytes, a file path, or the folder ``save_lora_weights``
        wrote. A name that is already registered raises LoraExistsError (param ``name``) unless
        ``new_version``. Nothing stays registered if this fails.
        """
        # 1. Check inputs before writing anything.
        _valid_name(name)
        try:
            manifest = LoraManifest.model_validate(manifest)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise InvalidLoraError(f"manifest.{field}: {first['msg']}", "manifest") from None
        data = _read_adapter(adapter)
        check_safetensors(data)
        if not new_version and self.exists(name):
            raise LoraExistsError(f"a LoRA named {name!r} is registered; ask for a new version to add one", "name")
        self.check_owner(name, owner)

        # 2. Claim the next version number; a lost race moves on to the next number. Start after
        # the last folder holding a claim: a local folder can show up before its claim does, and
        # skipping it would let two first registrations both see no lower claim.
        claimed = [v for v in self._claimed_versions(name) if self.storage.exists(self._claim_key(name, v))]
        version = (claimed[-1] if claimed else 0) + 1
        claim = json.dumps({"claimed_at": time.time(), "training_run": manifest.training_run}).encode()
        for _attempt in range(MAX_CLAIM_ATTEMPTS):
            if self.storage.put_if_absent(self._claim_key(name, version), claim, "application/json"):
                break
            version += 1
        else:
            raise LoraRegistryError(f"could not claim a version of {name!r}; retry", "name")
        if not new_version and any(w < version for w in self._live_versions(name, version)):
            # a concurrent first registration of the name: the lowest claimed number wins
            self.storage.delete(self._claim_key(name, version))
            raise LoraExistsError(f"a LoRA named {name!r} is being registered by someone else", "name")

        # 3. Weights, then the manifest: the version exists once the manifest does.
        record = LoraRecord(name=name, version=version, created_at=time.time(),
                            weights_key=self.weights_key(name, version), size_bytes=len(data),
                            sha256=hashlib.sha256(data).hexdigest(), manifest=manifest, owner=owner,
                            public=public)
        try:
            self.storage.put_bytes(record.weights_key, data, content_type="application/octet-stream")
            self.storage.put_json(self.manifest_key(name, version), record.model_dump(mode="json"))
        except BaseException:
            self.storage.delete_prefix(lora_prefix(name, version))
            raise
        return record

    def delete(self, name: str, version: int | None = None) -> int:
        """Delete one version (or every version) of ``name``; returns how many objects went."""
        _valid_name(name)
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise LoraNotFoundError(f"no LoRA named {name!r} is registered", "name")
            return sum(self.delete(name, v) for v in versions)
        version = _valid_version(version)
        if not self.storage.exists(self.manifest_key(name, version)):
            raise LoraNotFoundError(f"LoRA {name!r} has no version {version}", "version")
        # manifest first: the version disappears from get/list before its weights go. The claim
        # stays, so the number is never handed out again (replicas may cache "name:version").
        self.storage.delete(self.manifest_key(name, version))
        self.storage.delete(self.weights_key(name, version))
        self.storage.put_json(f"{lora_prefix(name, version)}{DELETED_NAME}", {"deleted_at": time.time()})
        return 2
