"""The ``datasets.import`` job: fill a dataset from URLs, a storage prefix or job outputs.

The request is what ``POST /v1/datasets/{id}/imports`` recorded: the dataset id, one source
(``urls``, ``prefix``, ``job_ids`` or ``output_keys``), optional ``captions``/``tags``/``license``,
and ``config``, the ingress's :class:`DatasetImportConfig` (allow-list and limits) at submit time.
Progress is one step per item; a cancel stops between items and commits nothing, so the
dataset keeps its previous version.
"""

from __future__ import annotations

from typing import Any

from storage.datasets import DatasetError, DatasetStore, check_prefix_allowed
from storage.url_import import DatasetImportConfig, UrlRefusedError

REPORTED = 100  # names listed in the job result; the counts are always complete


def dataset_import(ctx, handles: dict[str, Any]) -> None:
    from api.datasets.router import api_error
    from deployments.errors import InvalidRequestError

    request = ctx.request
    config = DatasetImportConfig.model_validate(request.get("config") or {})
    storage = ctx.store.storage
    store = DatasetStore(storage, max_image_bytes=config.max_bytes, max_pixels=config.max_pixels)
    dataset_id = request["dataset_id"]
    common = {"tags": request.get("tags") or [], "license": request.get("license")}

    def progress(done: int, total: int) -> None:
        ctx.step(done, total)
        ctx.check_cancelled()

    ctx.record.stages = ["import"]
    ctx.start_stage("import")
    ctx.check_cancelled()
    try:
        if request.get("urls") is not None:
            result = store.add_from_urls(dataset_id, request["urls"], config, captions=request.get("captions"),
                                         progress=progress, **common)
        elif request.get("prefix") is not None:
            # checked again: the config may have changed since the job was recorded
            prefix = check_prefix_allowed(request["prefix"], config.allowed_prefixes)
            # an outside s3:// prefix is read with the storage's own options (endpoint, credentials
            # chain), so no secret ever sits in a job record
            options = storage.storage_options if prefix.startswith("s3://") and storage.protocol == "s3" else None
            result = store.add_from_prefix(dataset_id, prefix, options, max_files=config.max_files,
                                           progress=progress, **common)
        elif request.get("job_ids") is not None:
            result = store.add_job_outputs(dataset_id, request["job_ids"], progress=progress, **common)
        elif request.get("output_keys") is not None:
            result = store.add_outputs(dataset_id, request["output_keys"], request.get("captions"),
                                       progress=progress, **common)
        else:
            raise InvalidRequestError("the import names no source (urls, prefix, job_ids or output_keys)", "urls")
    except DatasetError as exc:
        raise api_error(exc) from None
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
