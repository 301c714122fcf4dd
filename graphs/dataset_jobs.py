"""The dataset jobs: ``datasets.import`` (fill a dataset from URLs, a storage prefix or job outputs),
``datasets.collect`` (download search results) and ``datasets.captions`` (caption a version's images
with the language model, through Ray Data LLM: graphs/captioning.py).

The payload (:class:`graphs.payloads.DatasetImportPayload`) is what ``POST /v1/datasets/{id}/imports``
recorded: the dataset id, one source (``urls``, ``prefix``, ``job_ids`` or ``output_keys``), optional
``captions``/``tags``/``license``, and ``config``, the ingress's :class:`DatasetImportConfig`
(allow-list and limits) at submit time.
Progress is one step per item; a cancel stops between items and commits nothing, so the
dataset keeps its previous version.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from deployments.errors import (
    AtelierError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PayloadTooLargeError,
)
from deployments.llm.vision import CaptionSettings, clean_caption
from graphs.captioning import Captioner, ray_data_captioner
from graphs.payloads import DatasetCaptionsPayload, DatasetCollectPayload, DatasetImportPayload
from storage.datasets import (
    DatasetBusyError,
    DatasetConflictError,
    DatasetError,
    DatasetExistsError,
    DatasetNotFoundError,
    DatasetStore,
    DatasetTooLargeError,
    Rejection,
    UrlItem,
    check_prefix_allowed,
    image_content_type,
)
from storage.sources import RateLimitState, host_allowed, ping_download
from storage.url_import import UrlRefusedError

logger = logging.getLogger(__name__)

REPORTED = 100  # names listed in the job result; the counts are always complete


def import_summary(result) -> dict:
    """What an import job records of the version it wrote (counts, and the first REPORTED names)."""
    return {
        "dataset_id": result.dataset_id,
        "version": result.version,
        "added": result.added,
        "images": result.images,
        "duplicates": len(result.duplicates),
        "rejected": len(result.rejected),
        "duplicate_names": result.duplicates[:REPORTED],
        "rejections": [r.model_dump() for r in result.rejected[:REPORTED]],
    }


def dataset_error(exc: DatasetError) -> AtelierError:
    """The API's error for a dataset store's error, with its ``param`` (the import job and
    the datasets API both raise these)."""
    if isinstance(exc, DatasetNotFoundError):
        return NotFoundError(exc.message, exc.param)
    if isinstance(exc, DatasetExistsError):
        return ConflictError(exc.message, exc.param)
    if isinstance(exc, DatasetTooLargeError):
        return PayloadTooLargeError(exc.message, exc.param)
    if isinstance(exc, DatasetConflictError):
        return ConflictError(exc.message, exc.param)
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

    ctx.record.result = import_summary(result)


def _attribution(item) -> dict[str, Any]:
    """What the manifest keeps about a collected image (the credits export reads it)."""
    return {"source": item.source, "source_id": item.source_id, "title": item.description,
            "photographer": item.photographer, "photographer_url": item.photographer_url,
            "page_url": item.page_url, "license_url": item.license_url, "download_url": item.download_url}


def dataset_collect(ctx, handles: dict[str, Any]) -> None:
    """Job kind ``datasets.collect``: download search results into a new dataset version.

    1. Each result's download URL must be on its source's download hosts (the recorded config);
       one that is not is rejected by name. The rest are fetched through the safe URL importer
       (storage.url_import: SSRF checks, limits, deadlines), with every redirect hop held to the
       job's sources' download hosts (a hop off them rejects the item by name), deduped by
       content hash, and land as one version with their attribution in the manifest.
    2. After the commit, each Unsplash photo that landed has its ``download_location`` called (the
       API's guidelines), with the key from this process's environment. A ping that fails is
       reported in the result, never fails the import; once Unsplash's rate-limit headers say no
       request is left, the rest are not called but logged and reported as not pinged.

    Progress is one step per result; a cancel stops between (and during) fetches and commits nothing.
    """
    payload: DatasetCollectPayload = ctx.payload
    hosts = sorted({host for source in payload.sources.values() for host in source.download_hosts})
    config = payload.import_config.model_copy(update={"allowed_hosts": hosts})
    store = DatasetStore(ctx.store.storage, max_image_bytes=config.max_bytes, max_pixels=config.max_pixels)
    tags = list(payload.tags or [])

    def progress(done: int, total: int) -> None:
        ctx.step(done, total)
        ctx.check_cancelled()

    ctx.record.stages = ["collect"]
    ctx.start_stage("collect")
    ctx.check_cancelled()
    fetchable, refused = [], []
    for item in payload.items:
        source = payload.sources.get(item.source)
        if source is None or not host_allowed(item.download_url, source.download_hosts):
            refused.append((item.id, f"refused: {item.download_url!r} is not on {item.source}'s download hosts"))
            continue
        fetchable.append(UrlItem(url=item.download_url, filename=item.id, caption=item.description, tags=tags,
                                 source=item.source, license=item.license, attribution=_attribution(item)))
    try:
        if fetchable:
            result = store.add_from_url_items(payload.dataset_id, fetchable, config, progress=progress,
                                              poll=ctx.check_cancelled)
        else:
            result = store.writer(payload.dataset_id).commit()
    except DatasetError as exc:
        raise dataset_error(exc) from None
    except UrlRefusedError as exc:
        raise InvalidRequestError(str(exc), "result_ids") from None
    for name, reason in refused:
        result.rejected.append(Rejection(filename=name, reason=reason))

    # 2. the Unsplash download pings, for what landed
    failed_names = set(result.duplicates) | {r.filename for r in result.rejected}
    pings, ping_errors, rate = 0, [], RateLimitState()
    for item in payload.items:
        if item.id in failed_names or not item.download_location or item.source not in payload.sources:
            continue
        if item.source != "unsplash":
            continue
        problem = ping_download(payload.sources[item.source], item.download_location, payload.app_name, rate=rate)
        if problem is None:
            pings += 1
        else:
            logger.warning("collect job %s: the Unsplash download of %s was not counted: %s", ctx.id, item.id, problem)
            ping_errors.append({"filename": item.id, "reason": problem})

    ctx.record.result = {
        **import_summary(result),
        "download_pings": pings,
        "download_ping_errors": ping_errors[:REPORTED],
    }


# --- captions ----------------------------------------------------------------------------------


class CaptionsFailedError(AtelierError):
    """Every image the job asked about came back without a caption (the model refused them all)."""

    status_code = 502
    error_type = "server_error"


def caption_fingerprint(model: str, settings: CaptionSettings) -> str:
    """Names what makes a caption (the model and the settings): a re-run with the same fingerprint may
    reuse the captions an unfinished run made (storage.datasets.CaptionCheckpoint)."""
    blob = json.dumps({"model": model, **settings.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_captions(ctx, handles: dict[str, Any]) -> None:
    """Job kind ``datasets.captions``: caption a version's images with the LLM, into a new version.

    The captions come from Ray Data LLM against the running LLM deployment (graphs/captioning.py);
    ``handles["captioner"]``, when given, is a factory ``(storage, payload) -> Captioner`` used instead
    (tests without Ray).
    """
    payload: DatasetCaptionsPayload = ctx.payload
    storage = ctx.store.storage
    factory = handles.get("captioner")
    if factory is not None:
        captioner = factory(storage, payload)
    else:
        if handles.get("llm") is None:
            raise InvalidRequestError("captions need the language model, and this app deploys none", "dataset_id")
        captioner = ray_data_captioner(handles["llm"], storage, payload.model, payload.settings)
    ctx.record.result = run_captions(ctx, DatasetStore(storage), payload, captioner)


def run_captions(ctx, store: DatasetStore, payload: DatasetCaptionsPayload, captioner: Captioner) -> dict:
    """The captioning job's steps; returns the job's result.

    1. Read the version's images. With ``overwrite`` false an image with a caption keeps it (kept);
       the others are to be captioned.
    2. Captions an earlier, unfinished run with the same model and settings made are taken from its
       checkpoint (resumed); ``max_images`` caps the rest that are asked about (the others: skipped).
    3. The captioner answers batch by batch: each batch's captions go to the checkpoint, the job's
       progress moves, and a cancel stops here. Nothing is committed before step 4, so a cancel or
       a failure leaves the dataset as it was, and a re-run asks only about what is left.
    4. Every new caption, with the trigger word put first, lands as one new version
       (DatasetStore.commit_captions: a caption someone changed meanwhile is kept). Then the
       checkpoint goes.

    Counts: captioned + kept + skipped + failed + conflicts = the version's images.
    """
    ctx.record.stages = ["caption"]
    ctx.start_stage("caption")
    ctx.check_cancelled()
    try:
        rows = store.manifest(payload.dataset_id, payload.version).select(["sha256", "key", "caption"]).to_pylist()
        checkpoint = store.caption_checkpoint(payload.dataset_id, caption_fingerprint(payload.model, payload.settings))
        done = checkpoint.load()
    except DatasetError as exc:
        raise dataset_error(exc) from None

    # 1. kept, or to caption
    base = {row["sha256"]: row["caption"] or "" for row in rows}
    todo = [row for row in rows if payload.overwrite or not base[row["sha256"]].strip()]
    kept = len(rows) - len(todo)
    # 2. resumed from the checkpoint, asked about, or skipped over the cap
    made = {row["sha256"]: done[row["sha256"]] for row in todo if row["sha256"] in done}
    ask = [row for row in todo if row["sha256"] not in done]
    skipped = ask[payload.max_images:] if payload.max_images is not None else []
    ask = ask[:payload.max_images] if payload.max_images is not None else ask
    resumed = len(made)

    # 3. the model's captions, batch by batch
    failures: list[dict] = []
    total, finished = len(ask), 0
    ctx.step(0, max(total, 1))
    if ask:
        tasks = [{"sha256": row["sha256"], "key": row["key"], "content_type": image_content_type(row["key"])}
                 for row in ask]
        for batch in captioner(tasks):
            fresh = {}
            for outcome in batch:
                text = clean_caption(outcome.text) if outcome.error is None else ""
                if text:
                    fresh[outcome.sha256] = text
                else:
                    failures.append({"id": outcome.sha256,
                                     "reason": outcome.error or "the language model's caption was empty"})
            checkpoint.save(fresh)
            made.update(fresh)
            finished += len(batch)
            ctx.step(finished, total)
            ctx.check_cancelled()
    if failures and not made:
        raise CaptionsFailedError(f"no image got a caption: {failures[0]['reason']} (and {len(failures) - 1} more)"
                                  if len(failures) > 1 else f"no image got a caption: {failures[0]['reason']}")

    # 4. one new version
    ctx.check_cancelled()
    captions = {sha: clean_caption(text, payload.trigger_word) for sha, text in made.items()}
    try:
        committed = store.commit_captions(payload.dataset_id, payload.version, captions, base)
    except DatasetError as exc:
        raise dataset_error(exc) from None
    checkpoint.clear()
    ctx.step(max(total, 1), max(total, 1))
    return {
        "dataset_id": payload.dataset_id,
        "version": committed.version,
        "base_version": payload.version,
        "images": len(rows),
        "captioned": len(captions) - len(committed.conflicts),
        "kept": kept,
        "skipped": len(skipped),
        "failed": len(failures),
        "conflicts": len(committed.conflicts),
        "resumed": resumed,
        "model": payload.model,
        "style": payload.settings.style,
        "trigger_word": payload.trigger_word,
        "failures": failures[:REPORTED],
    }
