"""Dataset import and Ray Data read throughput, against plain Python loops in the same run.

1. Generates N small PNGs in memory (64x64 by default).
2. Import: ``DatasetStore.add_images`` (decode check, sha256, content-addressed fsynced writes,
   one Parquet manifest) against a plain loop that writes each file and reads its size with PIL.
3. Read: ``training.data.read_dataset`` consumed with ``iter_batches`` against a plain loop that
   opens the same files with PIL into arrays. The Ray read runs twice; the first includes
   starting Ray Data's workers, the second is the steady state.

    .venv/bin/python benchmarks/bench_datasets.py [--images 2000] [--size 64] [--cpus 2] [--storage-root DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from storage.datasets import DatasetStore, ImageItem  # noqa: E402
from storage.fs import Storage  # noqa: E402


def make_images(n: int, size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    out = []
    for i in range(n):
        pixels = np.stack([np.add.outer(ramp, ramp) // 2, np.tile(ramp, (size, 1)), np.full((size, size), i % 256,
                                                                                             np.uint8)], -1)
        pixels = (pixels + rng.integers(0, 16, pixels.shape)).astype(np.uint8)  # unique bytes per image
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def plain_write(images: list[bytes], folder: str) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as image:
            image.size  # noqa: B018  (what a simple importer records)
        path = os.path.join(folder, f"{i}.png")
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def plain_read(paths: list[str]) -> int:
    pixels = 0
    for path in paths:
        with Image.open(path) as image:
            pixels += np.asarray(image.convert("RGB")).shape[0]
    return len(paths)


def ray_read(root: str, dataset_id: str) -> int:
    from training.data import read_dataset

    rows = 0
    for batch in read_dataset(root, None, dataset_id).iter_batches(batch_size=256, batch_format="numpy"):
        rows += len(batch["image"])
    return rows


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f} images/s  ({seconds:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--storage-root", default=None, help="default: a temp folder")
    args = parser.parse_args()

    import ray

    work = tempfile.mkdtemp(prefix="bench-datasets-")
    root = args.storage_root or os.path.join(work, "root")
    images = make_images(args.images, args.size)
    print(f"{len(images)} PNGs of {args.size}x{args.size}, {sum(map(len, images)) / 1e6:.1f} MB, storage {root}")

    store = DatasetStore(Storage(root))
    dataset_id = store.create(f"bench-{os.getpid()}").id
    warm = DatasetStore(Storage(os.path.join(work, "warm")))  # first-call costs out of the timings
    warm.add_images(warm.create("warm").id, [ImageItem("w.png", images[0])])
    t = time.perf_counter()
    result = store.add_images(dataset_id, [ImageItem(f"{i}.png", d, caption=f"image {i}") for i, d in enumerate(images)])
    import_s = time.perf_counter() - t
    assert result.added == len(images), result
    t = time.perf_counter()
    plain_write(images, os.path.join(work, "plain"))
    plain_import_s = time.perf_counter() - t

    n = len(images)
    print(f"import  DatasetStore.add_images      {rate(n, import_s)}")
    print(f"        plain write loop (baseline)  {rate(n, plain_import_s)}")
    print(f"        ratio add_images / plain     {plain_import_s / import_s:.2f}x", flush=True)

    keys = store.manifest(dataset_id).column("key").to_pylist()
    paths = [store.storage.full_path(k) for k in keys]
    t = time.perf_counter()
    plain_read(paths)
    plain_read_s = time.perf_counter() - t

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t = time.perf_counter()
    assert ray_read(root, dataset_id) == len(images)
    cold_s = time.perf_counter() - t
    t = time.perf_counter()
    assert ray_read(root, dataset_id) == len(images)
    warm_s = time.perf_counter() - t
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    print(f"read    read_dataset, first run      {rate(n, cold_s)}")
    print(f"        read_dataset, second run     {rate(n, warm_s)}")
    print(f"        plain PIL loop (baseline)    {rate(n, plain_read_s)}")
    print(f"        ratio read_dataset / plain   {plain_read_s / warm_s:.2f}x (second run), "
          f"{plain_read_s / cold_s:.2f}x (first run)")


if __name__ == "__main__":
    main()
