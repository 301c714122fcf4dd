"""Storage shared by deployments, graphs and training: artifacts, job records, keys.

See :mod:`storage.fs` for the guarantees (atomic writes, key validation, pickling).
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
