"""The ``datasets.import`` job: fill a dataset from URLs, a storage prefix or job outputs.

The payload (:class:`graphs.payloads.DatasetImportPayload`) is what ``POST /v1/datasets/{id}/imports``
recorded: the dataset id, one source (``urls``, ``prefix``, ``job_ids`` or ``output_keys``), optional
``captions``/``tags``/``license``, and ``config``, the ingress's :class:`DatasetImportConfig`
(allow-list and limits) at submit time.
Progress is one step per item; a cancel stops between items and commits nothing, so the
dataset keeps its previous version.
"""

from __future__ import annotations

from typing import Any

from deployments.errors import (
    AtelierError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)
from graphs.payloads import DatasetImportPayload
from storage.datasets import (
    DatasetBusyError,
    DatasetError,
    DatasetExistsError,
    DatasetNotFoundError,
    DatasetStore,
    DatasetTooLargeError,
    check_prefix_allowed,
)
from storage.url_import import UrlRefusedError

REPORTED = 100  # names listed in the job result; the counts are always complete


def dataset_error(exc: DatasetError) -> AtelierError:
    """The API's error for a dataset store's error, with its ``param`` (the import job and
    the datasets API both raise these)."""
    if isinstance(exc, DatasetNotFoundError):
        return NotFoundError(exc.message, exc.param)
    if isinstance(exc, DatasetExistsError):
        return ConflictError(exc.message, exc.param)
    if isinstance(exc, DatasetTooLargeError):
        return PayloadTooLargeError(exc.message, exc.param)
    if isinstance(exc, DatasetBusyError):
        return OverloadedError(exc.message, exc.param, retry_after=1)
    return InvalidRequestError(exc.message, exc.param)


def dataset_import(ctx, handles: dict[str, Any]) -> None:
    """Job kind ``datasets.import``."""
    payload: DatasetImportPayload = ctx.payload
    config = payload.import_config
    storage = ctx.store.storage
    store = DatasetStore(storage, max_image_bytes=config.max_bytes, max_pixels=config.max_pixels)
    dataset_id = payload.dataset_id
    common = {"tags": payload.tags or [], "license": payload.license}

    def progress(done: int, total: int) -> None:
        ctx.step(done, total)
        ctx.check_cancelled()

    ctx.record.stages = ["import"]
    ctx.start_stage("import")
    ctx.check_cancelled()
    try:
        if payload.urls is not None:
            result = store.add_from_urls(dataset_id, payload.urls, config, captions=payload.captions,
                                         progress=progress, poll=ctx.check_cancelled, **common)
        elif payload.prefix is not None:
            # checked again (the config may have changed since the job was recorded), now also
            # against the storage root: nothing of Atelier's own data, whatever the config says
            prefix = check_prefix_allowed(payload.prefix, config.allowed_prefixes, storage_root=storage.root)
            # an outside s3:// prefix is read with the storage's own options (endpoint, credentials
            # chain), so no secret ever sits in a job record
            options = storage.storage_options if prefix.startswith("s3://") and storage.protocol == "s3" else None
            result = store.add_from_prefix(dataset_id, prefix, options, max_files=config.max_files,
                                           progress=progress, **common)
        elif payload.job_ids is not None:
            result = store.add_job_outputs(dataset_id, payload.job_ids, progress=progress, **common)
        elif payload.output_keys is not None:
            result = store.add_outputs(dataset_id, payload.output_keys, payload.captions,
                                       progress=progress, **common)
        else:
            raise InvalidRequestError("the import names no source (urls, prefix, job_ids or output_keys)", "urls")
    except DatasetError as exc:
        raise dataset_error(exc) from None
    except UrlRefusedError as exc:
        raise InvalidRequestError(str(exc), "urls") from None

    ctx.record.result = {
        "dataset_id": result.dataset_id,
        "version": result.version,
        "added": result.added,
        "images": result.images,
        "duplicates": len(result.duplicates),
        "rejected": len(result.rejected),
        "duplicate_names": result.duplicates[:REPORTED],
        "rejections": [r.model_dump() for r in result.rejected[:REPORTED]],
    }
