"""training.data: the Ray Data reader over local and S3 storage, and the training transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
from PIL import Image

from local.runner import init_local_ray

from storage.datasets import DatasetStore, ImageItem
from training.data import bucket_sizes, instance_caption, prepare_for_training, read_dataset
from tests.media import noise_image

SIZES = [(24, 16), (32, 32), (40, 24), (16, 40), (64, 48), (48, 64), (20, 20), (96, 32)]


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    init_local_ray()
    yield
    ray.shutdown()


@pytest.fixture()
def dataset(storage):
    store = DatasetStore(storage)
    dataset_id = store.create("faces", trigger_word="sks").id
    items = [ImageItem(f"{i}.png", noise_image(w, h, i), caption=f"photo {i}" if i % 2 else "")
             for i, (w, h) in enumerate(SIZES)]
    store.add_images(dataset_id, items[:6])
    store.add_images(dataset_id, items[6:])
    return storage, dataset_id, items


def rows_by_key(ds) -> dict:
    rows = {}
    for batch in ds.iter_batches(batch_size=3, batch_format="numpy"):
        for i, key in enumerate(batch["key"]):
            rows[key] = {name: column[i] for name, column in batch.items()}
    return rows


def test_reader_gives_images_and_captions(dataset):
    storage, dataset_id, items = dataset
    ds = read_dataset(storage.root, storage.storage_options, dataset_id, rows_per_block=3)
    assert ds.count() == 8
    keys = [key for batch in ds.iter_batches(batch_size=3, batch_format="numpy") for key in batch["key"]]
    assert len(keys) == len(set(keys)) == 8  # every row once, none twice (rows_by_key would hide a repeat)
    rows = rows_by_key(ds)
    assert len(rows) == 8
    by_caption = {i: item for i, item in enumerate(items)}
    manifest = {r["key"]: r for r in DatasetStore(storage).manifest(dataset_id).to_pylist()}
    for key, row in rows.items():
        index = int(manifest[key]["filename"].split(".")[0])
        width, height = SIZES[index]
        assert row["image"].shape == (height, width, 3) and row["image"].dtype == np.uint8
        assert (row["width"], row["height"]) == (width, height)
        assert row["caption"] == by_caption[index].caption
        assert np.array_equal(row["image"], np.asarray(Image.open(io.BytesIO(items[index].data)).convert("RGB")))
    # an earlier version reads as it was: its 6 rows, once each
    v1 = read_dataset(storage.root, storage.storage_options, dataset_id, version=1, rows_per_block=4)
    assert v1.count() == 6
    v1_keys = [key for batch in v1.iter_batches(batch_size=4, batch_format="numpy") for key in batch["key"]]
    assert len(v1_keys) == len(set(v1_keys)) == 6
    assert set(v1_keys) == set(DatasetStore(storage).manifest(dataset_id, 1).column("key").to_pylist())


def test_prepare_center_crop_drops_small_and_fills_captions(dataset):
    storage, dataset_id, _ = dataset
    ds = read_dataset(storage.root, storage.storage_options, dataset_id)
    prepared = prepare_for_training(ds, resolution=32, min_size=24, trigger_word="sks")
    rows = list(rows_by_key(prepared).values())
    # shorter side under 24: (24,16), (16,40), (20,20) dropped
    assert len(rows) == 5
    for row in rows:
        assert row["image"].shape == (32, 32, 3)
        assert (row["width"], row["height"]) == (32, 32)
        assert min(row["original_width"], row["original_height"]) >= 24
        assert row["caption"] == "a photo of sks" or row["caption"].startswith("photo ")
    assert sum(row["caption"] == "a photo of sks" for row in rows) == 2


def test_prepare_bucketing(dataset):
    storage, dataset_id, _ = dataset
    ds = read_dataset(storage.root, storage.storage_options, dataset_id)
    prepared = prepare_for_training(ds, resolution=256, mode="bucket", instance_prompt="portrait of {trigger_word}",
                                    trigger_word="sks")
    rows = rows_by_key(prepared)
    assert len(rows) == 8
    buckets = set(bucket_sizes(256))
    for row in rows.values():
        height, width = row["image"].shape[:2]
        assert (width, height) in buckets and width % 64 == 0 and height % 64 == 0
        aspect = row["original_width"] / row["original_height"]
        assert (width > height) == (aspect > 1.25) and (height > width) == (aspect < 0.8)
        assert row["caption"] == "portrait of sks" or row["caption"].startswith("photo ")


def test_buckets_and_captions():
    assert bucket_sizes(256) == [(192, 320), (256, 256), (320, 192)]
    assert all(w * h <= 1024 * 1024 and max(w, h) / min(w, h) <= 2 for w, h in bucket_sizes(1024))
    assert (1024, 1024) in bucket_sizes(1024)
    assert instance_caption(None, "sks") == "a photo of sks"
    assert instance_caption("a dog", "sks") == "sks, a dog"
    assert instance_caption("a {trigger_word} dog", "sks") == "a sks dog"
    assert instance_caption(None, None) is None
    with pytest.raises(ValueError):
        bucket_sizes(100)
