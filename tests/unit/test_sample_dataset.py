"""The sample dataset made in code (issue 20): captioned shapes, the same on every run."""

from __future__ import annotations

import io
import json

from PIL import Image

from storage.datasets import DatasetStore
from storage.fs import Storage
from storage.sample_dataset import TRIGGER, main, make_sample_dataset, sample_items


def test_sample_items_are_captioned_distinct_and_repeatable():
    items = sample_items(32)
    assert len(items) == 32 and len({i.data for i in items}) == 32
    assert [i.data for i in sample_items(32)] == [i.data for i in items]
    for item in items:
        assert Image.open(io.BytesIO(item.data)).size == (64, 64)
        assert item.caption.endswith(TRIGGER) and item.caption.startswith("a ")


def test_made_twice_it_is_one_dataset_of_one_version(tmp_path, capsys):
    store = DatasetStore(Storage(str(tmp_path / "root")))
    first = make_sample_dataset(store, count=36)
    assert (first["version"], first["images"], first["added"]) == (1, 36, 36)
    assert store.get(first["id"]).trigger_word == TRIGGER
    assert main(["--root", str(tmp_path / "root"), "--count", "36"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["id"], again["version"], again["added"]) == (first["id"], 1, 0)
    credits = json.loads(store.manifest(first["id"]).to_pylist()[0]["attribution"])
    assert credits["photographer"] == "Atelier (made in code)"
