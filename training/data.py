"""Ray Data readers and training transforms for datasets built in :mod:`storage.datasets`.

    ds = read_dataset("s3://bucket/atelier", opts, "ds_0123...", version=3)
    ds = prepare_for_training(ds, resolution=1024, mode="bucket", min_size=512, trigger_word="sks")
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"): ...

The manifest is read with pyarrow, and the image files through the same fsspec filesystem as
:class:`storage.fs.Storage` (local or S3), inside Ray tasks. Rows carry ``image`` (an
``HxWx3`` uint8 array), ``caption``, ``key``, ``width`` and ``height``. Images of different
sizes are ragged until prepared; ``iter_batches(batch_format="numpy")`` then gives an object
array of arrays, which is why captions and images are not read with ``iter_torch_batches``.
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Literal

import numpy as np
import ray
from PIL import Image, ImageOps
from ray.data.expressions import col

from storage.datasets import DatasetStore
from storage.fs import Storage
from training.config import instance_caption

__all__ = ["read_dataset", "prepare_for_training", "bucket_sizes", "instance_caption", "COLUMNS"]

COLUMNS = ["key", "caption", "width", "height"]  # kept from the manifest beside the decoded image


def read_dataset(storage_root: str, storage_options: dict | None, dataset_id: str, version: int | None = None,
                 *, rows_per_block: int = 256, read_threads: int = 8, num_cpus: float = 1.0) -> ray.data.Dataset:
    """A Ray Dataset of one dataset version (default: latest): decoded images plus captions.

    The manifest is split into blocks of ``rows_per_block`` rows so the reads and decodes run
    as parallel tasks of ``num_cpus`` each; within a task, S3 reads overlap on ``read_threads`` threads.
    """
    storage = Storage(storage_root, storage_options)
    table = DatasetStore(storage).manifest(dataset_id, version).select(COLUMNS)
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)] or [table]
    threads = read_threads if storage.protocol != "file" else 1
    return ray.data.from_arrow(blocks).map_batches(
        partial(_load_images, storage=storage, threads=threads), batch_format="numpy", batch_size=None,
        num_cpus=num_cpus)


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def _load_images(batch: dict[str, np.ndarray], storage: Storage, threads: int) -> dict[str, np.ndarray]:
    keys = [str(k) for k in batch["key"]]
    if threads > 1:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            blobs = list(pool.map(storage.get_bytes, keys))
    else:
        blobs = [storage.get_bytes(k) for k in keys]
    return {**batch, "image": _as_column([_decode(b) for b in blobs])}


def _as_column(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    # one (N, H, W, 3) tensor when the shapes agree, else a list Ray stores as a ragged tensor
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images


# --- preparation ---------------------------------------------------------------------------------


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(width, height)``: sides multiples of ``step``, area at most
    ``resolution**2`` (each side as large as that allows), aspect ratio at most ``max_aspect``."""
    if resolution < step or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    area = resolution * resolution
    buckets = set()
    for width in range(step, int(resolution * math.sqrt(max_aspect)) + step, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.add((width, height))
    return sorted(buckets)


def _nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def _resize_crop(image: np.ndarray, width: int, height: int) -> tuple[np.ndarray, int, int]:
    """Scale to cover ``width x height``, then center-crop; returns the array and the crop's top, left."""
    h, w = image.shape[:2]
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    resized = Image.fromarray(image).resize((rw, rh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    top, left = (rh - height) // 2, (rw - width) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height))), top, left


def _fill_captions(batch: dict[str, np.ndarray], caption: str) -> dict[str, np.ndarray]:
    batch["caption"] = np.asarray([c if str(c).strip() else caption for c in batch["caption"]], dtype=object)
    return batch


def _resize_batch(batch: dict[str, np.ndarray], sizes: tuple[int, int] | list[tuple[int, int]]) -> dict:
    prepared, tops, lefts = [], [], []
    for image in batch["image"]:
        target = sizes if isinstance(sizes, tuple) else _nearest_bucket(image.shape[1], image.shape[0], sizes)
        array, top, left = _resize_crop(image, *target)
        prepared.append(array)
        tops.append(top)
        lefts.append(left)
    return {
        **batch,
        "image": _as_column(prepared),
        "original_width": np.asarray(batch["width"], dtype=np.int32),
        "original_height": np.asarray(batch["height"], dtype=np.int32),
        "width": np.asarray([a.shape[1] for a in prepared], dtype=np.int32),
        "height": np.asarray([a.shape[0] for a in prepared], dtype=np.int32),
        "crop_top": np.asarray(tops, dtype=np.int32),  # SDXL's crop conditioning wants these
        "crop_left": np.asarray(lefts, dtype=np.int32),
    }


def prepare_for_training(ds: ray.data.Dataset, resolution: int, mode: Literal["center_crop", "bucket"] = "center_crop",
                         min_size: int = 0, instance_prompt: str | None = None, trigger_word: str | None = None,
                         *, max_aspect: float = 2.0, num_cpus: float = 1.0) -> ray.data.Dataset:
    """Ray Data transforms for training on a :func:`read_dataset` result.

    * ``center_crop``: scale the short side to ``resolution`` and crop the center square;
    * ``bucket``: snap each image to the aspect-ratio bucket (:func:`bucket_sizes`) nearest its
      own aspect, scale to cover it and center-crop; group batches by ``(width, height)``;
    * images whose shorter side is under ``min_size`` are dropped;
    * empty captions get :func:`instance_caption` (when there is a prompt or trigger word).

    ``width``/``height`` become the prepared size; ``original_width``/``original_height`` and
    ``crop_top``/``crop_left`` are added (SDXL's size and crop conditioning).
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer of at least 8, got {resolution!r}")
    if mode not in ("center_crop", "bucket"):
        raise ValueError(f"mode must be 'center_crop' or 'bucket', got {mode!r}")
    if min_size < 0:
        raise ValueError("min_size must be non-negative")
    sizes = (resolution, resolution) if mode == "center_crop" else bucket_sizes(resolution, max_aspect=max_aspect)
    caption = instance_caption(instance_prompt, trigger_word)
    if min_size:
        # the manifest's width/height are the decoded (EXIF-rotated) size, so no pixels are needed
        ds = ds.filter(expr=(col("width") >= min_size) & (col("height") >= min_size))
    if caption is not None:
        ds = ds.map_batches(partial(_fill_captions, caption=caption), batch_format="numpy", batch_size=None,
                            num_cpus=num_cpus)
    return ds.map_batches(partial(_resize_batch, sizes=sizes), batch_format="numpy", batch_size=None,
                          num_cpus=num_cpus)
