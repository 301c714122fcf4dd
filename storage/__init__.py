"""Storage shared by every layer above it: the fsspec layer and every store.

:mod:`storage.fs` (atomic writes, key validation, pickling) and :mod:`storage.keys` underlie the
stores: jobs (:mod:`storage.jobs`), datasets (:mod:`storage.datasets`, URL import in
:mod:`storage.url_import`), the LoRA registry (:mod:`storage.registry`), saved workflows
(:mod:`storage.workflows`) and fine-tuning records and run claims (:mod:`storage.fine_tuning`).
Nothing here imports a package above it.
"""

from storage.fs import (
    InvalidKeyError,
    ObjectNotFoundError,
    Storage,
    StorageError,
    validate_key,
    validate_prefix,
)

__all__ = [
    "Storage",
    "StorageError",
    "InvalidKeyError",
    "ObjectNotFoundError",
    "validate_key",
    "validate_prefix",
]
